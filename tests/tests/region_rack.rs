//! End to end: the real `regiond` and `rackd` binaries, registering, heartbeating, refusing.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use metalrack_api::RackState;
use metalrack_tests::{regiond, stderr, wait_for, Rack, Region, DEADLINE};
use reqwest::StatusCode;

/// An HTTPS client to `region` (trusting its certificate) that shows redirects instead of following them.
fn no_redirects(region: &Region) -> reqwest::Client {
    region.https_client_builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test]
async fn secret_file_is_created_0600_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let path = region.data_dir.join("secret");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let secret = region.secret();
    assert_eq!(secret.len(), 32);
    assert!(secret.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), secret);
    assert_eq!(std::fs::metadata(region.data_dir.join("region.db")).unwrap().permissions().mode() & 0o077, 0);

    for bad in ["abc", "0011223344556677889900112233445g", "00112233445566778899001122334455aa"] {
        let output = region.command(&["secret", "set", bad]);
        assert_eq!(output.status.code(), Some(2), "secret set {bad}");
        assert!(stderr(&output).contains("invalid secret"), "{}", stderr(&output));
        assert_eq!(region.secret(), secret, "a refused secret changes nothing");
    }
    let output = region.command(&["secret", "set", "ABCDEF0123456789abcdef0123456789"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(region.secret(), "abcdef0123456789abcdef0123456789");
    let output = region.command(&["secret", "rotate"]);
    assert!(output.status.success());
    let rotated = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert_eq!(region.secret(), rotated);
    assert_ne!(rotated, "abcdef0123456789abcdef0123456789");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}

#[tokio::test]
async fn createadmin_login_sessions_and_api_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");

    // A duplicate is refused, exit non-zero, and changes nothing (the first password still works).
    let output = region.command(&[
        "createadmin",
        "--username",
        "admin",
        "--password",
        "other password",
        "--email",
        "x@example.com",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("already exists"), "{}", stderr(&output));

    // Asked for what is omitted: answers come one per line when stdin is not a terminal.
    let ask = |answers: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(metalrack_tests::binary("regiond"))
            .arg("--data-dir")
            .arg(&region.data_dir)
            .arg("createadmin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(answers.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let output = ask("ops\nlong password\nlong passwurd\nops@example.com\n\n");
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("passwords differ"), "{}", stderr(&output));
    let output =
        ask("ops\nlong password\nlong password\nops@example.com\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5 ops@laptop\n");
    assert!(output.status.success(), "{}", stderr(&output));

    // The UI and API over HTTPS, as a browser that was redirected there.
    let client = no_redirects(&region);
    let base = region.https_url();
    let login = |username: &'static str, password: &'static str| {
        client.post(format!("{base}/login")).form(&[("username", username), ("password", password)]).send()
    };
    assert_eq!(login("admin", "other password").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(login("nobody", "correct horse battery").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let response = login("admin", "correct horse battery").await.unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/MAAS/welcome", "first login shows the welcome page");
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();

    let page = client.get(format!("{}/controllers", base)).header("cookie", &session).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let anonymous = client.get(format!("{}/controllers", base)).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
    assert_eq!(anonymous.headers()["location"], "/MAAS/login");

    // Forms carry the session's CSRF token, as the page hands it out: a form without it, or sent
    // from another site, changes nothing.
    let welcome = client.get(format!("{}/welcome", base)).header("cookie", &session).send().await.unwrap();
    let welcome = welcome.text().await.unwrap();
    let csrf = welcome
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the welcome form carries a CSRF token")
        .to_owned();
    let forged = client
        .post(format!("{}/welcome", base))
        .header("cookie", &session)
        .form(&[("action", "save"), ("cluster_name", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN, "a form without the token is refused");
    let cross_site = client
        .post(format!("{}/welcome", base))
        .header("cookie", &session)
        .header("origin", "http://attacker.example")
        .form(&[("action", "save"), ("cluster_name", "forged"), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN, "a form from another origin is refused");
    let page = client.get(format!("{}/controllers", base)).header("cookie", &session).send().await.unwrap();
    assert!(!page.text().await.unwrap().contains("forged"), "the cluster was not renamed");

    // Skipping the welcome page is remembered: the next login goes to the dashboard.
    let skip = client
        .post(format!("{}/welcome", base))
        .header("cookie", &session)
        .form(&[("action", "skip"), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(skip.status(), StatusCode::SEE_OTHER);
    assert_eq!(login("ops", "long password").await.unwrap().headers()["location"], "/MAAS/");

    // Logging out ends the session on the server, not just in the browser.
    let logout = client
        .post(format!("{}/logout", base))
        .header("cookie", &session)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), StatusCode::SEE_OTHER);
    let after = client.get(format!("{}/controllers", base)).header("cookie", &session).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER);

    // The API refuses anonymous and wrong keys with a JSON reason, and accepts the real key.
    for auth in [None, Some("Bearer nope.nope"), Some("Bearer ")] {
        let mut request = client.get(format!("{}/api/v1/racks", base));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        let body: metalrack_api::ErrorBody = response.json().await.unwrap();
        assert!(!body.error.is_empty());
    }
    let response = client.get(format!("{}/api/v1/account", base)).bearer_auth(&api_key).send().await.unwrap();
    assert!(response.headers().get("connection").is_none(), "a request without a body keeps its connection");
    let account: metalrack_api::AccountView = response.json().await.unwrap();
    assert_eq!(account.username, "admin");
    assert!(account.is_admin);

    // Bad requests get a 4xx with a reason; a body over the limit is refused before it is read.
    let malformed = client
        .post(format!("{}/api/v1/racks/challenge", base))
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert!(malformed.headers().get("connection").is_none(), "its body was read whole: the connection stays");
    assert!(malformed.json::<metalrack_api::ErrorBody>().await.unwrap().error.contains("JSON"));
    let huge = format!("{{\"name\": \"{}\"}}", "a".repeat(200_000));
    let response = client
        .post(format!("{}/api/v1/racks/challenge", base))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        response.headers().get("connection").and_then(|v| v.to_str().ok()),
        Some("close"),
        "the unread rest of the body ends the connection: the answer must say so"
    );
    let bad_name = client
        .post(format!("{}/api/v1/racks/challenge", base))
        .json(&serde_json::json!({"name": "no spaces"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_name.status(), StatusCode::BAD_REQUEST);

    let events = region.event_messages(&api_key).await;
    assert!(events.iter().any(|e| e.starts_with("user.login ") && e.contains("admin")), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("user.login_failed")), "{events:?}");
    let log = region.daemon.log_text();
    assert!(!log.contains("correct horse") && !log.contains("$argon2"), "no passwords or hashes in logs");
}

#[tokio::test]
async fn wrong_secret_unreachable_and_malformed_url_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let rack = Rack::new(dir.path(), "r1");
    let cases = [
        (region.url.clone(), "00000000000000000000000000000000".to_owned(), "wrong secret"),
        ("http://127.0.0.1:1/MAAS".to_owned(), region.secret(), "cannot reach the region"),
        ("region:5240/MAAS".to_owned(), region.secret(), "not a region URL"),
        (region.url.clone(), "not-hex".to_owned(), "invalid secret"),
        (format!("{}/../nothing-here", region.url), region.secret(), "not as a Metalrack region"),
    ];
    for (url, secret, expected) in cases {
        let output = rack.register(&url, &secret);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{url}: {message}");
        assert!(message.contains(expected), "{url}: expected {expected:?} in {message:?}");
        assert_eq!(message.trim().lines().count(), 1, "one line: {message:?}");
        assert!(!rack.data_dir.exists(), "nothing written after {expected}");
    }
    assert!(region.racks(&api_key).await.is_empty());
    let events = region.event_messages(&api_key).await;
    assert!(events.iter().any(|e| e.starts_with("rack.refused") && e.contains("wrong secret")), "{events:?}");
    assert_eq!(rack.command(&["status"]).status.code(), Some(1));
}

#[tokio::test]
async fn three_racks_go_online_and_a_stopped_one_goes_offline() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let secret = region.secret();
    let mut racks: Vec<Rack> = ["r1", "r2", "r3"].iter().map(|name| Rack::new(dir.path(), name)).collect();
    for rack in &mut racks {
        rack.register_ok(&region.url, &secret);
        let registration = rack.data_dir.join("registration.toml");
        assert_eq!(std::fs::metadata(&registration).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(
            !std::fs::read_to_string(&registration).unwrap().contains(&secret),
            "the secret is not stored on the rack"
        );
        rack.serve();
    }
    for rack in &racks {
        region.wait_rack_state(&api_key, &rack.name, RackState::Online).await;
    }
    let listed = region.racks(&api_key).await;
    assert_eq!(listed.len(), 3);
    let health = listed[0].health.as_ref().expect("health reported");
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert!(health.disk_total_bytes > 0 && health.uptime_s > 0);
    assert!(racks[0].status().contains("heartbeat:    ok"), "{}", racks[0].status());

    racks[1].daemon.as_mut().unwrap().kill();
    region.wait_rack_state(&api_key, "r2", RackState::Offline).await;
    let states: Vec<_> = region.racks(&api_key).await.into_iter().map(|r| (r.name, r.state)).collect();
    assert!(
        states.contains(&("r1".into(), RackState::Online)) && states.contains(&("r3".into(), RackState::Online)),
        "{states:?}"
    );

    // Registering again under the same name replaces the registration: still three rows.
    racks[1].register_ok(&region.url, &secret);
    racks[1].serve();
    region.wait_rack_state(&api_key, "r2", RackState::Online).await;
    assert_eq!(region.racks(&api_key).await.len(), 3);
}

#[tokio::test]
async fn racks_ride_out_a_region_outage_and_log_once_per_state_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let mut rack = Rack::new(dir.path(), "r1");
    rack.register_ok(&region.url, &region.secret());
    rack.serve();
    region.wait_rack_state(&api_key, "r1", RackState::Online).await;

    region.daemon.terminate().unwrap();
    wait_for("rack to notice the region is gone", DEADLINE, || async {
        rack.status().contains("region unreachable").then_some(())
    })
    .await;
    // Let several retries happen (backoff tops out at 400 ms in tests), then count log lines.
    let first_failure = std::fs::read_to_string(rack.data_dir.join("status.json")).unwrap();
    wait_for("a few more retries", DEADLINE, || async {
        (std::fs::read_to_string(rack.data_dir.join("status.json")).unwrap() != first_failure).then_some(())
    })
    .await;
    region.restart();
    let daemon = rack.daemon.as_ref().unwrap();
    wait_for("rack back online", DEADLINE, || async {
        (daemon.log_text().matches("heartbeat: online").count() == 2).then_some(())
    })
    .await;
    region.wait_rack_state(&api_key, "r1", RackState::Online).await;
    let log = daemon.log_text();
    assert_eq!(log.matches("heartbeat failing").count(), 1, "one line per state change:\n{log}");
}

#[tokio::test]
async fn secret_overwritten_by_hand_then_restart_makes_racks_register_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let old_secret = region.secret();
    let mut rack = Rack::new(dir.path(), "r1");
    rack.register_ok(&region.url, &old_secret);
    rack.serve();
    region.wait_rack_state(&api_key, "r1", RackState::Online).await;

    // The operator overwrites the file by hand (new inode, default mode) and restarts the region.
    let new_secret = "0123456789abcdef0123456789abcdef";
    let path = region.data_dir.join("secret");
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, format!("{new_secret}\n")).unwrap();
    region.restart();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "tightened on start");

    region.wait_rack_state(&api_key, "r1", RackState::NeedsReregistration).await;
    wait_for("rack to be told to register again", DEADLINE, || async {
        let status = rack.status();
        (status.contains("must register again") && status.contains("secret changed")).then_some(())
    })
    .await;
    let events = region.event_messages(&api_key).await;
    assert!(events.iter().any(|e| e.starts_with("secret.changed")), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("rack.refused") && e.contains("older secret")), "{events:?}");

    // The old secret no longer registers, and the refused attempt leaves the old registration as is.
    let registration_before = std::fs::read(rack.data_dir.join("registration.toml")).unwrap();
    let output = rack.register(&region.url, &old_secret);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("wrong secret"));
    assert_eq!(std::fs::read(rack.data_dir.join("registration.toml")).unwrap(), registration_before);

    // With the new secret it registers again; the running `rackd serve` picks that up by itself.
    rack.register_ok(&region.url, new_secret);
    region.wait_rack_state(&api_key, "r1", RackState::Online).await;
    assert_eq!(region.racks(&api_key).await.len(), 1);
    wait_for("rack status online", Duration::from_secs(10), || async {
        rack.status().contains("heartbeat:    ok").then_some(())
    })
    .await;
}

#[tokio::test]
async fn apikey_for_unknown_user_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = regiond(&dir.path().join("region"), &["apikey", "--username", "ghost"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("no user named \"ghost\""), "{}", stderr(&output));
}

/// `createadmin` on a real terminal (a pty from util-linux `script`): it prompts for what is
/// missing, asks for the password twice, and does not echo it.
#[tokio::test]
async fn createadmin_prompts_on_a_terminal_without_echoing_the_password() {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("region");
    let command =
        format!("{} --data-dir {} createadmin", metalrack_tests::binary("regiond").display(), data_dir.display());
    let mut child = std::process::Command::new("script")
        .args(["--quiet", "--flush", "--return", "--command", &command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("script(1) from util-linux");
    let screen = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = {
        let screen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let mut stdin = child.stdin.take().unwrap();
    // Answer each prompt only once it is on screen, as a person would.
    let mut seen = 0;
    for (prompt, answer) in [
        ("Username: ", "ttyadmin"),
        ("Password: ", "tty password 1"),
        ("Again: ", "tty password 1"),
        ("Email: ", "tty@example.com"),
        ("Enter to skip): ", ""),
    ] {
        seen = wait_for(&format!("prompt {prompt:?}"), DEADLINE, || {
            let screen = screen.lock().unwrap();
            let found = screen[seen..].find(prompt).map(|i| seen + i + prompt.len());
            async move { found }
        })
        .await;
        stdin.write_all(format!("{answer}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let screen = screen.lock().unwrap().clone();
    assert!(status.success(), "{screen}");
    assert!(screen.contains("Created administrator \"ttyadmin\""), "{screen}");
    assert!(screen.contains("ttyadmin"), "the username is echoed: {screen}");
    assert!(!screen.contains("tty password 1"), "the password is not echoed: {screen}");
    let output = regiond(&data_dir, &["apikey", "--username", "ttyadmin"]);
    assert!(output.status.success());
}

#[tokio::test]
async fn ui_pages_forbid_framing_and_caching_and_the_register_command_ignores_the_host_header() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    region.create_admin("admin", "correct horse battery");
    let client = no_redirects(&region);
    let response = client
        .post(format!("{}/login", region.https_url()))
        .form(&[("username", "admin"), ("password", "correct horse battery")])
        .send()
        .await
        .unwrap();
    let session = response.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();

    // A request naming another host (as anyone can) must not put that host into the command a
    // rack will run with the secret.
    let page = client
        .get(format!("{}/controllers/add", region.https_url()))
        .header("cookie", &session)
        .header("host", "attacker.example:5240")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let headers = page.headers().clone();
    let body = page.text().await.unwrap();
    let expected = format!("rackd register --url {} --secret {}", region.url, region.secret());
    assert!(body.contains(&expected), "the command uses the region's own address: {body}");
    assert!(!body.contains("attacker.example"), "{body}");

    assert_eq!(headers["cache-control"], "no-store", "a page showing the secret is not cached");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("frame-ancestors 'none'") && policy.contains("default-src 'self'"), "{policy}");
}

#[tokio::test]
async fn a_write_held_up_by_another_writer_is_answered_503_with_retry_after_not_500() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    // Another process holds the database's write lock (as a long `regiond` CLI command or a
    // backup tool could) for longer than the region's busy timeout.
    let database = region.data_dir.join("region.db");
    let mut locker = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, time\n\
             db = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             db.execute('BEGIN EXCLUSIVE')\n\
             print('locked', flush=True)\n\
             time.sleep(30)\n",
        )
        .arg(&database)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    std::io::BufReader::new(locker.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "locked");

    let client = region.https_client();
    let put = || {
        client
            .put(format!("{}/api/v1/machines/52-54-00-aa-bb-07", region.https_url()))
            .bearer_auth(&api_key)
            .json(&serde_json::json!({"hostname": "node7", "boot": {"kind": "local"}}))
            .send()
    };
    let busy = put().await.unwrap();
    assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(busy.headers()["retry-after"], "1");
    locker.kill().unwrap();
    locker.wait().unwrap();
    let done = put().await.unwrap();
    assert_eq!(done.status(), StatusCode::NO_CONTENT, "the same write goes through once the lock is gone");
}

#[tokio::test]
async fn rackd_register_takes_the_secret_from_stdin_or_a_file_so_it_stays_out_of_ps() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let secret = region.secret();

    let from_stdin = Rack::new(dir.path(), "stdin-rack");
    let mut child = from_stdin
        .command_for(&["register", "--url", &region.url, "--secret", "-", "--name", "stdin-rack"])
        .unwrap()
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{secret}\n").as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));

    let file = dir.path().join("secret.txt");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let from_file = Rack::new(dir.path(), "file-rack");
    let register_from_file = || {
        let args = ["register", "--url", &region.url, "--secret-file", file.to_str().unwrap(), "--name", "file-rack"];
        from_file.command_for(&args).unwrap().output().unwrap()
    };
    let output = register_from_file();
    assert!(output.status.success(), "{}", stderr(&output));

    // A wrong secret from a file is refused like one on the command line.
    std::fs::write(&file, "00000000000000000000000000000000\n").unwrap();
    let output = register_from_file();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("wrong secret"), "{}", stderr(&output));
}

/// The data-rack names of a controllers page's rows, in order.
fn controller_rows(page: &str) -> Vec<String> {
    page.split(r#"<tr data-rack=""#).skip(1).map(|row| row.split('"').next().unwrap().to_owned()).collect()
}

/// 150 racks: `GET /racks` answers 100 a page by name with the total on every page, a deep page
/// shows a rack's latest (still buffered) heartbeat, a limit over the maximum is a 400 that says
/// why; the controllers page pages the same way with links; the dashboard counts every rack by
/// state; the "add machine" form still offers every rack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rack_list_and_the_controllers_page_go_a_page_at_a_time_and_the_dashboard_counts_every_rack() {
    use metalrack_api::{paths, ErrorBody, HeartbeatRequest, RackHealth, RackPage, RACK_PAGE_MAX};
    use metalrack_tests::scale::{rack_name, register_racks, ui_session};
    const RACKS: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let api = region.api(&api_key);
    let racks = register_racks(&region, RACKS).await.unwrap();
    // A rack on the second page heartbeats twice: the first is written at once (it comes
    // online), the second waits in the buffer, and the page must show it.
    let deep = &racks[120];
    deep.heartbeat().await.unwrap();
    let latest = RackHealth { version: "latest-heartbeat".into(), ..RackHealth::default() };
    deep.heartbeat_with(&HeartbeatRequest { health: latest, sync: None }).await.unwrap();
    racks[0].heartbeat().await.unwrap();

    // The API: the default page is the first 100 by name, the total on every page.
    let response = api.request(reqwest::Method::GET, paths::RACKS).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let first: RackPage = response.json().await.unwrap();
    assert_eq!(first.total, RACKS as u64);
    let names: Vec<String> = first.racks.iter().map(|r| r.name.clone()).collect();
    assert_eq!(names, (0..100).map(rack_name).collect::<Vec<_>>());
    assert_eq!(first.racks[0].state, RackState::Online);
    let second = api.racks_page(100, 100).await.unwrap();
    assert_eq!(second.total, RACKS as u64);
    assert_eq!(
        second.racks.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
        (100..150).map(rack_name).collect::<Vec<_>>()
    );
    let shown = second.racks.iter().find(|r| r.name == rack_name(120)).unwrap();
    assert_eq!(shown.state, RackState::Online);
    assert_eq!(shown.health.as_ref().map(|h| h.version.as_str()), Some("latest-heartbeat"));
    assert!(api.racks_page(RACKS as u64, 100).await.unwrap().racks.is_empty(), "past the end: an empty page");
    // Small pages one after another hold every rack once, in order.
    let mut paged = Vec::new();
    while paged.len() < RACKS {
        let page = api.racks_page(paged.len() as u64, 40).await.unwrap();
        assert!(!page.racks.is_empty() && page.racks.len() <= 40);
        paged.extend(page.racks.into_iter().map(|r| r.name));
    }
    assert_eq!(paged, (0..RACKS).map(rack_name).collect::<Vec<_>>());
    assert_eq!(api.racks().await.unwrap().len(), RACKS, "the client pages through every rack");
    for limit in [0, RACK_PAGE_MAX + 1] {
        let path = format!("{}?limit={limit}", paths::RACKS);
        let response = api.request(reqwest::Method::GET, &path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: ErrorBody = response.json().await.unwrap();
        assert_eq!(body.error, format!("limit must be 1 to {RACK_PAGE_MAX}"));
    }

    // The UI: 100 controllers a page by name, counts and links.
    let ui = ui_session(&region, "admin", "correct horse battery").await.unwrap();
    let get = |path: &str| {
        let (ui, url) = (ui.clone(), format!("{}{path}", region.https_url()));
        async move {
            let response = ui.get(&url).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{url}");
            response.text().await.unwrap()
        }
    };
    let page = get("/controllers").await;
    assert_eq!(controller_rows(&page), (0..100).map(rack_name).collect::<Vec<_>>());
    assert!(page.contains("150 rack controllers · showing 1–100"), "{page}");
    assert!(page.contains(r#"href="/MAAS/controllers?offset=100" id="next""#), "{page}");
    assert!(!page.contains(r#"id="previous""#), "{page}");
    let page = get("/controllers?offset=100").await;
    assert_eq!(controller_rows(&page), (100..150).map(rack_name).collect::<Vec<_>>());
    assert!(page.contains("150 rack controllers · showing 101–150"), "{page}");
    assert!(page.contains(r#"href="/MAAS/controllers?offset=0" id="previous""#), "{page}");
    assert!(!page.contains(r#"id="next""#), "{page}");
    let row = page.split(&format!(r#"<tr data-rack="{}""#, rack_name(120))).nth(1).unwrap();
    let row = row.split("</tr>").next().unwrap();
    assert!(row.contains(r#"data-state="online""#) && row.contains("latest-heartbeat"), "{row}");

    // The dashboard counts every rack, not a page of them.
    let dashboard = get("/").await;
    assert!(dashboard.contains(r#"<span class="big">150</span><span>rack controllers</span>"#), "{dashboard}");
    assert!(dashboard.contains("2 online · 148 offline"), "{dashboard}");
    assert!(!dashboard.contains("Add your first rack"), "{dashboard}");

    // The "add machine" form offers every rack, by name.
    let form = get("/machines/add").await;
    let select = form.split(r#"<select name="rack" id="rack">"#).nth(1).unwrap().split("</select>").next().unwrap();
    let offered: Vec<&str> = select.split("\">").skip(1).map(|option| option.split('<').next().unwrap()).collect();
    assert_eq!(offered, (0..RACKS).map(rack_name).collect::<Vec<_>>());
}
