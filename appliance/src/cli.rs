//! The `rackd` command line: argument parsing and one function per subcommand.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::RackConfig;
use crate::data_dir::DataDir;
use crate::status::{now_ms, LinkState};

/// The Metalrack rack appliance: registers with a region and serves the machines of its rack.
///
/// Register once with the command the region's UI shows (Controllers → Add rack controller),
/// then run `rackd serve`.
#[derive(Debug, Parser)]
#[command(name = "rackd", version, propagate_version = true)]
pub struct Cli {
    /// Where the rack keeps its registration and state.
    #[arg(long, global = true, env = "METALRACK_DATA_DIR", default_value = "/var/lib/metalrack/rack")]
    pub data_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register this rack with a region. Registering again replaces the old registration.
    Register {
        /// The region's URL, e.g. http://REGION:5240/MAAS
        #[arg(long)]
        url: String,
        /// The region's shared secret (32 hex characters; `regiond secret show` prints it), or
        /// `-` to read it from standard input, so it does not show in `ps` or shell history.
        #[arg(long, required_unless_present = "secret_file", conflicts_with = "secret_file")]
        secret: Option<String>,
        /// A file holding the secret (its first line), instead of `--secret`.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// The rack's name in the region. Default: this machine's hostname.
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the rack: heartbeats to the region, image sync, and PXE with a [pxe] config.
    Serve {
        /// A TOML config file (see docs/examples/rack.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show the registration and the last heartbeat.
    Status,
    /// Show the running appliance's image sync, or (--now) make it sync at once.
    Sync {
        /// Sync now, whatever the policy's delay or window says.
        #[arg(long)]
        now: bool,
        /// Follow the sync with a progress bar until it ends, then print its figures.
        #[arg(long)]
        wait: bool,
    },
}

/// Runs the command line and turns an error into one readable line and exit code 2.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Serve { .. }));
    // The rack's files (credential, state) are for its own eyes only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // The config sizes the runtime, so it is read before there is one.
    let config = match &cli.command {
        Command::Serve { config: Some(path) } => match RackConfig::load(path) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("rackd: error: {}", metalrack_image_tools::error_chain(&e));
                return ExitCode::from(2);
            }
        },
        _ => RackConfig::default(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime_worker_threads())
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("rackd: error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match runtime.block_on(run(cli, config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rackd: error: {e:#}");
            ExitCode::from(2)
        }
    };
    // `serve` has stopped its tasks by now; this bounds a blocking call that would not end.
    runtime.shutdown_timeout(crate::serve::SHUTDOWN_GRACE);
    code
}

fn init_tracing(serving: bool) {
    use std::io::IsTerminal;
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Runs one subcommand; `config` is the serve config, already read (the default otherwise).
pub async fn run(cli: Cli, config: RackConfig) -> anyhow::Result<ExitCode> {
    let data_dir = DataDir::new(cli.data_dir);
    match cli.command {
        Command::Register { url, secret, secret_file, name } => {
            let secret = read_secret(secret.as_deref(), secret_file.as_deref())?;
            register(&data_dir, &url, &secret, name).await
        }
        Command::Serve { .. } => {
            crate::serve::run(&data_dir, &config, shutdown_signal()?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => Ok(status(&data_dir)?),
        Command::Sync { now, wait } => sync(&data_dir, now, wait).await,
    }
}

/// Longest secret input read from a file or stdin: a secret is 32 characters; a few more allow
/// for whitespace, and a wrong file (an image, say) is refused instead of read whole.
const SECRET_INPUT_BYTES_MAX: u64 = 1024;

/// The secret from `--secret VALUE`, `--secret -` (stdin) or `--secret-file FILE`: its first
/// line, trimmed.
fn read_secret(secret: Option<&str>, secret_file: Option<&Path>) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Read;
    let text = match (secret, secret_file) {
        (Some("-"), _) => {
            let mut text = String::new();
            std::io::stdin()
                .take(SECRET_INPUT_BYTES_MAX)
                .read_to_string(&mut text)
                .context("cannot read the secret from standard input")?;
            text
        }
        (Some(value), _) => return Ok(value.to_owned()),
        (None, Some(path)) => {
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(SECRET_INPUT_BYTES_MAX).read_to_string(&mut text))
                .with_context(|| format!("cannot read the secret from {}", path.display()))?;
            text
        }
        (None, None) => anyhow::bail!("give the secret with --secret, --secret - or --secret-file"),
    };
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}

async fn register(data_dir: &DataDir, url: &str, secret: &str, name: Option<String>) -> anyhow::Result<ExitCode> {
    let name = match name {
        Some(name) => name,
        None => crate::registration::default_rack_name()?,
    };
    let timeout = Duration::from_millis(RackConfig::default().region_request_timeout_ms);
    let registration = crate::registration::register(url, secret, &name, data_dir, timeout).await?;
    println!(
        "Registered rack {:?} (id {}) with region {} (cluster {:?}).\nPinned the region's TLS certificate, sha256 \
         {}.\nStart it with: rackd serve",
        registration.rack_name,
        registration.rack_id,
        registration.region_url,
        registration.cluster_name,
        registration.region_certificate_sha256.as_deref().unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM or SIGINT. The handlers are installed at once, so a signal during start-up stops the
/// rack the same orderly way instead of killing it.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

/// Prints the registration and heartbeat state. Exit code 1 when not registered, so scripts can test it.
fn status(data_dir: &DataDir) -> anyhow::Result<ExitCode> {
    let Some(registration) = crate::registration::load(data_dir)? else {
        println!("registration: not registered (data dir {})", data_dir.root().display());
        return Ok(ExitCode::from(1));
    };
    println!("rack:         {} (id {})", registration.rack_name, registration.rack_id);
    println!("region:       {} (cluster {:?})", registration.region_url, registration.cluster_name);
    println!("registered:   {}", ago(registration.registered_at_ms));
    let pin = registration.region_certificate_sha256.as_deref().unwrap_or("none: register again (before TLS)");
    println!("certificate:  sha256 {pin} (pinned at registration)");
    match crate::status::load(data_dir) {
        None => println!("heartbeat:    none yet (is 'rackd serve' running?)"),
        Some(status) => {
            let running = Path::new(&format!("/proc/{}", status.pid)).exists();
            println!(
                "serve:        {}",
                if running { format!("running (pid {})", status.pid) } else { "not running".to_owned() }
            );
            let last_ok = status.last_success_ms.map(ago).unwrap_or_else(|| "never".to_owned());
            match status.state {
                LinkState::Online => println!("heartbeat:    ok, last {last_ok}"),
                state => println!("heartbeat:    {} (last ok {last_ok}): {}", state.label(), status.message),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ago(at_ms: i64) -> String {
    let s = (now_ms() - at_ms).max(0) / 1000;
    format!("{s} s ago")
}

async fn sync(data_dir: &DataDir, now: bool, wait: bool) -> anyhow::Result<ExitCode> {
    use metalrack_api::images::SyncPhase;
    let socket = data_dir.control_socket();
    let before = if now {
        crate::control::call(&socket, hyper::Method::POST, "/sync").await?
    } else {
        crate::control::call(&socket, hyper::Method::GET, "/status").await?
    };
    if !wait {
        print_sync(&before.report, now);
        return Ok(ExitCode::SUCCESS);
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let status = loop {
        let status = crate::control::call(&socket, hyper::Method::GET, "/status").await?;
        let report = &status.report;
        bar.set_length(report.bytes_total);
        bar.set_position(report.bytes_done);
        bar.set_message(format!("{:?}", report.phase).to_lowercase());
        let finished = if now {
            status.completed_runs > before.completed_runs
        } else {
            !matches!(report.phase, SyncPhase::Syncing)
        };
        if finished {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    print_sync(&status.report, false);
    Ok(if status.report.phase == SyncPhase::Failed { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn print_sync(report: &metalrack_api::images::SyncReport, triggered: bool) {
    if triggered {
        println!("sync requested");
    }
    let message = if report.message.is_empty() { String::new() } else { format!(": {}", report.message) };
    println!("sync:         {:?}{message}", report.phase);
    println!(
        "snapshot:     {} (revision {})",
        report.snapshot_id.as_deref().unwrap_or("none"),
        report.snapshot_revision
    );
    if let Some(last) = &report.last_sync {
        println!(
            "last sync:    {} chunks fetched, {} bytes fetched ({} received), {} bytes reused, {} refetched, {:.1} s",
            last.chunks_fetched,
            last.bytes_fetched,
            last.bytes_received,
            last.bytes_reused,
            last.chunks_refetched,
            last.duration_ms as f64 / 1000.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_comes_from_the_option_a_file_or_nowhere_else() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "0123456789abcdef0123456789abcdef\nignored\n").unwrap();
        assert_eq!(read_secret(None, Some(&file)).unwrap(), "0123456789abcdef0123456789abcdef");
        assert_eq!(read_secret(Some("abc"), None).unwrap(), "abc");
        assert!(read_secret(None, Some(&dir.path().join("missing"))).is_err());

        let parse =
            |args: &[&str]| Cli::try_parse_from([&["rackd", "register", "--url", "http://r:5240/MAAS"], args].concat());
        assert!(parse(&["--secret", "x"]).is_ok());
        assert!(parse(&["--secret-file", "f"]).is_ok());
        assert!(parse(&[]).is_err(), "a secret is required");
        assert!(parse(&["--secret", "x", "--secret-file", "f"]).is_err(), "one source of the secret");
    }
}
