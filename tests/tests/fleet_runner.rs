//! README.md's "A simulated site" commands, run as written: each line of the section's command
//! block is a `target/debug/fleet ...` command, run from the workspace root (where the README's
//! paths start) with the `fleet` this test was built with, and must succeed: `fleet check` of the
//! seed's scenario describes its 45 machines, and `fleet run` of the small scenario ends with its
//! machines commissioned, deployed and booted from their disks.

use std::path::Path;
use std::process::Command;

use metalrack_tests::readme::readme_path;

const SECTION: &str = "## A simulated site";

/// The command lines of the section's first code block (comments cut).
fn section_commands() -> Vec<String> {
    let markdown = std::fs::read_to_string(readme_path()).unwrap();
    let section = markdown.split_once(SECTION).expect("README.md has the section").1;
    let block = section.split("```sh\n").nth(1).expect("a command block").split("```").next().unwrap();
    block
        .lines()
        .map(|line| line.split_once('#').map_or(line, |(command, _)| command).trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect()
}

#[test]
fn the_readmes_simulated_site_commands_check_the_seed_and_run_the_small_site_to_deployed_machines() {
    let commands = section_commands();
    assert_eq!(commands.len(), 2, "{commands:?}");
    let workspace = readme_path().parent().unwrap().to_owned();
    let fleet = metalrack_tests::binary("fleet");
    let mut outputs = Vec::new();
    for command in &commands {
        let args: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(args[0], "target/debug/fleet", "{command}");
        let output = Command::new(&fleet).args(&args[1..]).current_dir(&workspace).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{command}: {}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push(stdout);
    }
    assert!(outputs[0].contains("45 machines"), "fleet check of the seed: {}", outputs[0]);
    let run = &outputs[1];
    assert!(run.contains("2 commissioned") && run.contains("2 deployed"), "fleet run: {run}");
    let booted = run.lines().filter(|l| l.starts_with("rack1-m") && l.contains("BootedLocal")).count();
    assert_eq!(booted, 2, "both machines booted from their disks: {run}");
    assert!(Path::new(&workspace).join("hardware/scenarios/small.toml").exists());
}
