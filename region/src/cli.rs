//! The `regiond` command line: argument parsing and one function per subcommand.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use metalrack_api::Secret;

use crate::config::RegionConfig;
use crate::db::Store;
use crate::http::AppState;
use crate::state::Shared;
use crate::tls::TlsSource;
use crate::users::{hash_password, validate_email, validate_ssh_key, validate_username, NewUser};

/// The region server of Metalrack: catalogue, users, racks, events, web UI and API.
///
/// Start with `regiond serve`, then `regiond createadmin`, then open https://HOST:5240/MAAS/.
#[derive(Debug, Parser)]
#[command(name = "regiond", version, propagate_version = true)]
pub struct Cli {
    /// Where the region keeps its database and secret.
    #[arg(long, global = true, env = "METALRACK_DATA_DIR", default_value = "/var/lib/metalrack/region")]
    pub data_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the region: web UI and API over HTTPS, and plain HTTP for rack registration, on one
    /// port (default 5240, path /MAAS/).
    Serve {
        /// Address to listen on; overrides `listen` in the config file.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// A TOML config file (see docs/examples/region.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve this PEM certificate (chain, leaf first) instead of the one the region makes in
        /// DATA/tls/. Racks pin it at registration: after it changes they must register again.
        #[arg(long, requires = "tls_key", value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert", value_name = "FILE")]
        tls_key: Option<PathBuf>,
    },
    /// Create an administrator. Asks on the terminal for whatever is not given.
    Createadmin {
        #[arg(long)]
        username: Option<String>,
        /// Prefer the prompt: a password on the command line lands in shell history.
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        email: Option<String>,
        /// An SSH public key for deployed machines; repeat for several.
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<String>,
    },
    /// Show or change the shared secret racks register with.
    Secret {
        #[command(subcommand)]
        action: SecretAction,
    },
    /// The region's TLS certificate.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },
    /// Print a user's API keys (for `Authorization: Bearer KEY`).
    Apikey {
        #[arg(long)]
        username: String,
        /// Create a new key and print it.
        #[arg(long)]
        new: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretAction {
    /// Print the secret.
    Show,
    /// Set the secret to 32 hex characters. Registered racks must register again.
    Set { secret: String },
    /// Replace the secret with a new random one. Registered racks must register again.
    Rotate,
}

#[derive(Debug, Subcommand)]
pub enum TlsAction {
    /// Print the certificate's path and SHA-256: give the file to `imgtool --ca-cert` and
    /// `curl --cacert`, or the fingerprint to `imgtool --region-cert-sha256`.
    Show {
        /// The certificate `regiond serve --tls-cert` serves, if not the one made in DATA/tls/.
        #[arg(long, value_name = "FILE")]
        tls_cert: Option<PathBuf>,
    },
}

/// Runs the command line and turns an error into one readable line and exit code 2.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Serve { .. }));
    // Everything the region writes (database, secret) is for its own eyes only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("regiond: error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("regiond: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let data_dir = cli.data_dir;
    match cli.command {
        Command::Serve { listen, config, tls_cert, tls_key } => {
            let own_tls = tls_cert.zip(tls_key).map(|(certificate, key)| TlsSource::Files { certificate, key });
            serve(&data_dir, listen, config.as_deref(), own_tls).await
        }
        Command::Createadmin { username, password, email, ssh_keys } => {
            createadmin(&data_dir, username, password, email, ssh_keys).await
        }
        Command::Secret { action } => secret(&data_dir, action).await,
        Command::Apikey { username, new } => apikey(&data_dir, &username, new).await,
        Command::Tls { action: TlsAction::Show { tls_cert } } => tls_show(&data_dir, tls_cert),
    }
}

async fn serve(
    data_dir: &Path,
    listen: Option<std::net::SocketAddr>,
    config: Option<&Path>,
    own_tls: Option<TlsSource>,
) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown_signal()?;
    let config = match config {
        Some(path) => RegionConfig::load(path)?,
        None => RegionConfig::default(),
    };
    let listen = listen.unwrap_or(config.listen);
    let store = Store::open(data_dir).await?;
    let (_, generation) = crate::secret::reconcile(data_dir, &store, "regiond serve").await?;
    tracing::info!(data_dir = %data_dir.display(), generation, "region starting");
    let tls_source = own_tls
        .unwrap_or_else(|| TlsSource::Generated { names: crate::tls::default_names(listen.ip(), &config.tls_names) });
    let tls = crate::tls::load_or_create(data_dir, &tls_source)?;
    tracing::info!(
        certificate = %tls.certificate_path.display(),
        sha256 = %hex::encode(tls.certificate_sha256),
        "TLS certificate racks pin"
    );
    let state = AppState::new(Shared::new(store.clone(), config, data_dir.to_owned()), tls.certificate_sha256)?;
    crate::http::serve(state, listen, tls.server_config, shutdown)
        .await
        .with_context(|| format!("cannot serve on {listen}"))?;
    store.close().await;
    tracing::info!("region stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed now, before the listener prints its
/// address, not when the future is first polled: a signal that comes in between (a supervisor
/// stopping the region at once) must stop it in order, not kill it.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Reads answers for `createadmin`: from the terminal with prompts, or one per line from a pipe.
struct Prompter {
    interactive: bool,
    lines: std::io::Lines<std::io::StdinLock<'static>>,
}

impl Prompter {
    fn new() -> Prompter {
        Prompter { interactive: std::io::stdin().is_terminal(), lines: std::io::stdin().lock().lines() }
    }

    fn ask(&mut self, prompt: &str) -> anyhow::Result<String> {
        if self.interactive {
            eprint!("{prompt}: ");
            std::io::stderr().flush()?;
        }
        match self.lines.next() {
            Some(line) => Ok(line?.trim().to_owned()),
            None => bail!("no answer for {prompt:?} (standard input ended); pass it as an option instead"),
        }
    }

    fn ask_password(&mut self, prompt: &str) -> anyhow::Result<String> {
        if self.interactive {
            Ok(rpassword::prompt_password(format!("{prompt}: "))?)
        } else {
            match self.lines.next() {
                Some(line) => Ok(line?),
                None => bail!("no answer for {prompt:?} (standard input ended); pass it as an option instead"),
            }
        }
    }
}

async fn createadmin(
    data_dir: &Path,
    username: Option<String>,
    password: Option<String>,
    email: Option<String>,
    mut ssh_keys: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let mut prompter = Prompter::new();
    let fully_interactive = username.is_none();
    let username = match username {
        Some(u) => u,
        None => prompter.ask("Username")?,
    };
    validate_username(&username)?;
    let password = match password {
        Some(p) => p,
        None => {
            let first = prompter.ask_password("Password")?;
            let again = prompter.ask_password("Again")?;
            if first != again {
                bail!("the two passwords differ; nothing was changed");
            }
            first
        }
    };
    let email = match email {
        Some(e) => e,
        None => prompter.ask("Email")?,
    };
    validate_email(&email)?;
    if fully_interactive && ssh_keys.is_empty() {
        let key = prompter.ask("SSH public key (optional, Enter to skip)")?;
        if !key.is_empty() {
            ssh_keys.push(key);
        }
    }
    for key in &ssh_keys {
        validate_ssh_key(key)?;
    }
    let password_hash = tokio::task::spawn_blocking(move || hash_password(&password)).await??;
    let store = Store::open(data_dir).await?;
    let new = NewUser {
        username: &username,
        email: &email,
        password_hash: &password_hash,
        is_admin: true,
        ssh_keys: &ssh_keys,
    };
    crate::users::create_admin(&store, &new, "regiond createadmin").await?;
    store.close().await;
    println!("Created administrator {username:?}. Log in at https://HOST:5240/MAAS/");
    Ok(ExitCode::SUCCESS)
}

fn tls_show(data_dir: &Path, tls_cert: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let path = tls_cert.unwrap_or_else(|| crate::tls::generated_certificate_path(data_dir));
    if !path.exists() {
        bail!("no certificate at {} yet: 'regiond serve' makes it on its first start", path.display());
    }
    let sha256 = crate::tls::certificate_file_sha256(&path)?;
    println!("certificate  {}", path.display());
    println!("sha256       {}", hex::encode(sha256));
    Ok(ExitCode::SUCCESS)
}

async fn secret(data_dir: &Path, action: SecretAction) -> anyhow::Result<ExitCode> {
    match action {
        SecretAction::Show => {
            let secret = crate::secret::load_or_create(data_dir)?;
            println!("{}", secret.expose());
        }
        SecretAction::Set { secret } => {
            let secret = Secret::parse(&secret).context("invalid secret")?;
            replace_secret(data_dir, &secret, "regiond secret set").await?;
            println!("Secret set. Every rack must register again with the new secret.");
        }
        SecretAction::Rotate => {
            let secret = crate::secret::generate();
            replace_secret(data_dir, &secret, "regiond secret rotate").await?;
            println!("{}", secret.expose());
            eprintln!("Secret rotated. Every rack must register again with the new secret.");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn replace_secret(data_dir: &Path, secret: &Secret, actor: &str) -> anyhow::Result<()> {
    let store = Store::open(data_dir).await?;
    crate::secret::write(data_dir, secret)?;
    // Adopting it now (not at the next restart) refuses old racks' heartbeats at once.
    crate::secret::reconcile(data_dir, &store, actor).await?;
    store.close().await;
    Ok(())
}

async fn apikey(data_dir: &Path, username: &str, new: bool) -> anyhow::Result<ExitCode> {
    let store = Store::open(data_dir).await?;
    for key in crate::users::api_keys(&store, username, new).await? {
        println!("{key}");
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_contract() {
        let cli = Cli::try_parse_from(["regiond", "--data-dir", "/tmp/x", "secret", "set", "00"]).unwrap();
        assert!(matches!(cli.command, Command::Secret { action: SecretAction::Set { .. } }));
        let cli =
            Cli::try_parse_from(["regiond", "createadmin", "--username", "u", "--ssh-key", "a", "--ssh-key", "b"])
                .unwrap();
        assert!(matches!(cli.command, Command::Createadmin { ref ssh_keys, .. } if ssh_keys.len() == 2));
    }
}
