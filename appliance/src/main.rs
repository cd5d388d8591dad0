//! The `rackd` binary; everything lives in the library so tests can reach it.

fn main() -> std::process::ExitCode {
    metalrack_appliance::cli::main()
}
