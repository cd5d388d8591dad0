//! README.md's operator guide, run for real: every command it shows is read from the Markdown at
//! test time, its placeholders replaced (REGION:5240, KEY, the secret, paths, jammy.img), and run
//! through `sh` against a real `regiond` and `rackd`; each must succeed and have the effect the
//! guide promises. A command the guide gains must be given a step here, or the test fails.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use metalrack_api::machines::BootAction;
use metalrack_api::{AccountView, RackState};
use metalrack_image_tools::Hash;
use metalrack_tests::process::Spawn;
use metalrack_tests::readme::{operator_guide_commands, readme_path, substitute, GuideCommand};
use metalrack_tests::{binary, random_bytes, stderr, wait_for, Daemon, Rack, Region, DEADLINE};

/// Commands the guide shows that this test does not run as shown, with the reason. Keep it tiny.
const NOT_RUN_AS_SHOWN: [(&str, &str); 4] = [
    ("imgtool chunk", "named without arguments (\"Local tools\"): checked to exist with --help"),
    ("imgtool inspect", "named without arguments (\"Local tools\"): checked to exist with --help"),
    ("imgtool diff", "named without arguments (\"Local tools\"): checked to exist with --help"),
    ("imgtool verify", "named without arguments (\"Local tools\"): checked to exist with --help"),
];

/// Commands the guide shows that need a machine booting the deploy environment (minutes of QEMU
/// and a downloaded kernel): each is checked to parse, every flag it uses listed by its `--help`.
/// `tests/tests/machines_cli.rs` runs them against a real region and a rack client.
const CHECKED_NOT_RUN: [(&str, &str); 3] = [
    ("metalrack machines commission", "metalrack machines commission --help"),
    ("metalrack machines deploy", "metalrack machines deploy --help"),
    ("metalrack machines release", "metalrack machines release --help"),
];

const MAC: &str = "52:54:00:aa:bb:01";
/// The machine the guide's "Machines" section adds.
const MACHINE_MAC: &str = "52:54:00:aa:bb:02";

/// The guide's commands, handed out to the steps that run them; all must be handed out.
struct Guide {
    commands: Vec<GuideCommand>,
    taken: Vec<bool>,
}

impl Guide {
    fn load() -> Guide {
        let markdown = std::fs::read_to_string(readme_path()).expect("README.md at the workspace root");
        let commands = operator_guide_commands(&markdown);
        assert!(commands.len() >= 10, "README.md's operator guide shows commands: {commands:#?}");
        Guide { taken: vec![false; commands.len()], commands }
    }

    /// The first command not yet taken that is `prefix` or starts with `prefix` and a space.
    fn take(&mut self, prefix: &str) -> String {
        let index = self
            .commands
            .iter()
            .zip(&self.taken)
            .position(|(c, taken)| !taken && (c.text == prefix || c.text.starts_with(&format!("{prefix} "))))
            .unwrap_or_else(|| panic!("README.md's operator guide no longer shows `{prefix} ...`: update this test"));
        self.taken[index] = true;
        self.commands[index].text.clone()
    }

    fn assert_all_taken(&self) {
        let left: Vec<String> = self
            .commands
            .iter()
            .zip(&self.taken)
            .filter(|(_, taken)| !**taken)
            .map(|(c, _)| format!("README.md:{}: {}", c.line, c.text))
            .collect();
        assert!(left.is_empty(), "commands of the operator guide no step runs (add one): {left:#?}");
    }
}

/// An operator's shell: the built binaries first on PATH, each program's data dir by
/// METALRACK_DATA_DIR (as the guide suggests), and the placeholders' values.
struct Shell {
    bin_dir: PathBuf,
    region_dir: PathBuf,
    rack_dir: PathBuf,
    /// `metalrack`'s login file (never the operator's own under ~/.config).
    login_file: PathBuf,
    /// Placeholder and value, replaced in this order; `None` until the value is known.
    values: Vec<(&'static str, Option<String>)>,
}

impl Shell {
    fn set(&mut self, placeholder: &str, value: &str) {
        let slot = self.values.iter_mut().find(|(p, _)| *p == placeholder).expect("a known placeholder");
        slot.1 = Some(value.to_owned());
    }

    /// `text` with the placeholders replaced; panics if it needs one whose value is unknown yet.
    fn expand(&self, text: &str) -> String {
        let known: Vec<(&str, &str)> = self.values.iter().filter_map(|(p, v)| Some((*p, v.as_deref()?))).collect();
        let expanded = substitute(text, &known);
        for (placeholder, value) in &self.values {
            if value.is_none() {
                assert_eq!(substitute(&expanded, &[(placeholder, "")]), expanded, "{placeholder} unknown in {text}");
            }
        }
        expanded
    }

    /// `sh -c TEXT` (expanded); `exec` for daemons, so the process is the program itself.
    fn command(&self, text: &str, exec: bool) -> Command {
        let expanded = self.expand(text);
        let program = expanded.split_whitespace().next().unwrap_or_default();
        let mut command = Command::new("sh");
        command.arg("-c").arg(if exec { format!("exec {expanded}") } else { expanded.clone() });
        let path = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("{}:{path}", self.bin_dir.display()));
        command.env_remove("METALRACK_DATA_DIR");
        command.env("METALRACK_LOGIN_FILE", &self.login_file);
        match program {
            "regiond" => command.env("METALRACK_DATA_DIR", &self.region_dir),
            "rackd" => command.env("METALRACK_DATA_DIR", &self.rack_dir),
            _ => &mut command,
        };
        command
    }

    /// Runs `text` with `stdin` as its input; panics unless it succeeds.
    fn run_with_input(&self, text: &str, stdin: &str) -> Output {
        let mut child = self
            .command(text, false)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh runs");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "`{}` failed ({}):\n{}{}",
            self.expand(text),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            stderr(&output)
        );
        output
    }

    fn run(&self, text: &str) -> String {
        String::from_utf8(self.run_with_input(text, "").stdout).unwrap()
    }

    /// Starts `text` in the background (stopped at the end or on drop); `piped` keeps its
    /// stdout for the caller.
    fn start(&self, name: &str, text: &str, log: &Path, piped: bool) -> Daemon {
        Daemon::spawn(name, self.command(text, true), log, piped, Spawn::default()).unwrap()
    }
}

fn secret_file(region_dir: &Path) -> String {
    let path = region_dir.join("secret");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "{}", path.display());
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

fn is_secret(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn every_command_of_the_operator_guide_works_as_shown() {
    let curl = Command::new("curl").arg("--version").output();
    assert!(curl.is_ok_and(|o| o.status.success()), "curl is installed (apt-get install curl)");
    let mut guide = Guide::load();
    let dir = tempfile::tempdir().unwrap();
    let region_dir = dir.path().join("region");
    let rack_dir = dir.path().join("rack");
    let config = dir.path().join("region.toml");
    std::fs::copy(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/region.toml"), &config).unwrap();
    let image = dir.path().join("jammy.img");
    let image_bytes = random_bytes(2 << 20, 1);
    std::fs::write(&image, &image_bytes).unwrap();
    let ssh_key = "'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 ops@laptop'";
    let mut shell = Shell {
        bin_dir: binary("regiond").parent().unwrap().to_owned(),
        region_dir: region_dir.clone(),
        rack_dir: rack_dir.clone(),
        login_file: dir.path().join("metalrack-login.toml"),
        values: vec![
            ("[--name NAME]", Some("--name rack1".into())),
            ("[--version V]", Some("--version 1".into())),
            ("--ssh-key KEY", Some(format!("--ssh-key {ssh_key}"))),
            // Port 0, not 5240: the machine is shared; the region prints the port it got.
            ("0.0.0.0:5240", Some("127.0.0.1:0".into())),
            ("/etc/metalrack/region.toml", Some(config.display().to_string())),
            ("jammy.img", Some(image.display().to_string())),
            ("REGION:5240", None),
            // The region's certificate as the operator copied it (here: where the region made it).
            ("cert.pem", None),
            ("KEY", None),
            ("0123456789abcdef0123456789abcdef", None),
            ("HEX32", Some("00112233445566778899aabbccddeeff".into())),
            ("U", Some("ops".into())),
            ("P", Some("'ops password 1'".into())),
            ("E", Some("ops@example.com".into())),
        ],
    };

    // 1. `regiond serve`: the data dir and its secret (0600, 32 hex) are made on first start.
    let serve = guide.take("regiond serve");
    assert!(!serve.contains("--listen"), "{serve}");
    let first = shell.start("regiond", &format!("{serve} --listen 127.0.0.1:0"), &dir.path().join("first.log"), true);
    let mut region = Region::from_started(&region_dir, first).unwrap();
    let page = region.https_client().get(format!("{}/login", region.https_url())).send().await.unwrap();
    assert!(page.status().is_success(), "the UI answers: {}", page.status());
    let secret = secret_file(&region_dir);
    assert!(is_secret(&secret), "{secret:?}");
    region.daemon.terminate().unwrap();

    // `regiond createadmin` asks (answers one per line when stdin is no terminal).
    let createadmin = guide.take("regiond createadmin");
    let output = shell.run_with_input(&createadmin, "admin\nadmin password 1\nadmin password 1\nadmin@example.com\n\n");
    assert!(String::from_utf8_lossy(&output.stdout).contains("Created administrator \"admin\""), "{output:?}");

    // The options: the example config, the scripted createadmin, apikey.
    let serve = guide.take("regiond serve --listen");
    let daemon = shell.start("regiond", &serve, &dir.path().join("region.log"), true);
    let mut region = Region::from_started(&region_dir, daemon).unwrap();
    assert_eq!(secret_file(&region_dir), secret, "the secret is kept across restarts");
    shell.set("REGION:5240", region.url.trim_start_matches("http://").trim_end_matches("/MAAS"));
    shell.run(&guide.take("regiond createadmin --username"));
    let key = shell.run(&guide.take("regiond apikey")).lines().next().expect("a key").trim().to_owned();
    assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "shell-safe as shown: {key}");
    let account: AccountView =
        region.api(&key).request(reqwest::Method::GET, "/account").send().await.unwrap().json().await.unwrap();
    assert_eq!(account.username, "ops");
    assert!(account.is_admin);
    shell.set("KEY", &key);
    let api = region.api(&key);

    // The shared secret: show, set, rotate, each as the file holds it.
    assert_eq!(shell.run(&guide.take("regiond secret show")).trim(), secret);
    shell.run(&guide.take("regiond secret set"));
    assert_eq!(secret_file(&region_dir), "00112233445566778899aabbccddeeff");
    let rotated = shell.run(&guide.take("regiond secret rotate")).trim().to_owned();
    assert!(is_secret(&rotated) && rotated != "00112233445566778899aabbccddeeff", "{rotated:?}");
    assert_eq!(secret_file(&region_dir), rotated);
    shell.set("0123456789abcdef0123456789abcdef", &rotated);

    // 3. Add a rack: register (the registration 0600, without the secret), serve, status.
    shell.run(&guide.take("rackd register"));
    let registration = rack_dir.join("registration.toml");
    assert_eq!(std::fs::metadata(&registration).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!std::fs::read_to_string(&registration).unwrap().contains(&rotated), "the secret is not stored");
    let serve = guide.take("rackd serve");
    let mut rack = Rack {
        data_dir: rack_dir.clone(),
        name: "rack1".into(),
        daemon: Some(shell.start("rackd", &serve, &dir.path().join("rack.log"), false)),
    };
    region.wait_rack_state(&key, "rack1", RackState::Online).await;
    let status = guide.take("rackd status");
    let shown = wait_for("rackd status to show the heartbeat", DEADLINE, || async {
        let shown = shell.run(&status);
        shown.contains("heartbeat:    ok").then_some(shown)
    })
    .await;
    assert!(shown.contains("rack1") && shown.contains(&region.url), "registration and region: {shown}");

    // 4. Images: the certificate to trust, push over HTTPS (listed by the region), then the
    // rack syncs it now.
    let shown = shell.run(&guide.take("regiond tls show"));
    let certificate = region.certificate_path();
    assert!(shown.contains(&certificate.display().to_string()), "the path: {shown}");
    assert!(shown.contains(&region.certificate_sha256()), "the fingerprint: {shown}");
    shell.set("cert.pem", &certificate.display().to_string());
    let pushed = shell.run(&guide.take("imgtool push"));
    assert!(pushed.contains("committed"), "{pushed}");
    let listed = api.image("ubuntu/jammy").await.unwrap();
    assert_eq!(listed.versions.len(), 1);
    assert_eq!((listed.versions[0].version.as_str(), listed.versions[0].size_bytes), ("1", 2 << 20));
    let synced = shell.run(&guide.take("rackd sync"));
    assert!(synced.contains("bytes fetched"), "the figures: {synced}");
    let hash = Hash::of(&image_bytes).to_hex();
    wait_for("the region to show jammy.img on the rack (next heartbeat)", DEADLINE, || async {
        api.rack_serves_file("rack1", &hash).await.unwrap().then_some(())
    })
    .await;
    for (command, reason) in NOT_RUN_AS_SHOWN {
        guide.take(command);
        let help = shell.run(&format!("{command} --help"));
        assert!(!help.is_empty(), "{command}: {reason}");
    }

    // 5. PXE: tell the region what a machine boots; it lists the machine so.
    let answer = shell.run(&guide.take("curl"));
    let machines = api.machines().await.unwrap();
    let machine = machines.iter().find(|m| m.mac == MAC);
    let machine = machine.unwrap_or_else(|| panic!("the machine PUT took no effect; curl printed: {answer:?}"));
    assert_eq!(machine.hostname, "node1");
    assert_eq!(
        machine.boot.clone().expect("the PUT set a boot decision"),
        BootAction::Image {
            image: "ubuntu/noble".into(),
            arch: "amd64".into(),
            version: "1".into(),
            kernel_params: "console=ttyS0".into()
        }
    );

    // 6. Machines. The deploy environment's build downloads a kernel: the script is checked to
    // exist and imgtool to take every flag the guide passes through it.
    let build = guide.take("scripts/build-deploy-env");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(build.split_whitespace().next().unwrap());
    assert!(
        std::fs::metadata(&script).unwrap().permissions().mode() & 0o111 != 0,
        "{} is executable",
        script.display()
    );
    let help = shell.run("imgtool deploy-env build --help");
    for flag in build.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "imgtool deploy-env build takes {flag}: {help}");
    }
    // metalrack: log in (saved 0600), add a machine with its BMC password from the environment
    // (shown nowhere), list and show it.
    let login = shell.run(&guide.take("metalrack login"));
    assert!(login.contains("as ops"), "{login}");
    assert_eq!(std::fs::metadata(&shell.login_file).unwrap().permissions().mode() & 0o777, 0o600);
    let add = guide.take("METALRACK_POWER_PASSWORD=bmc-password metalrack machines add");
    let added = shell.run(&add);
    assert!(added.contains("state:     New") && !added.contains("bmc-password"), "{added}");
    let machine = api.machine(MACHINE_MAC).await.unwrap();
    assert_eq!(machine.hostname, "node2");
    assert!(machine.power.expect("power parameters").password_set);
    let listed = shell.run(&guide.take("metalrack machines list"));
    assert!(listed.lines().any(|l| l.contains(MACHINE_MAC) && l.contains("New")), "{listed}");
    let shown = shell.run(&guide.take("metalrack machines show"));
    assert!(shown.contains(&machine.id) && shown.contains("(redfish)"), "{shown}");
    for (command, help) in CHECKED_NOT_RUN {
        let text = guide.take(command);
        assert!(text.contains(MACHINE_MAC), "{text}");
        let help = shell.run(help);
        for flag in text.split_whitespace().filter(|w| w.starts_with("--")) {
            assert!(help.contains(flag), "`{command}` takes {flag}: {help}");
        }
    }

    guide.assert_all_taken();
    rack.daemon.as_mut().unwrap().terminate().unwrap();
    region.daemon.terminate().unwrap();
}
