//! metalrack: the region's API from a shell. `metalrack login URL KEY` once, then
//! `metalrack machines list | show | add | commission | deploy | release | power ...` and
//! `metalrack images list`. Tables for people, `--output json` for scripts; exit code 0 when done,
//! 1 when a waited-for operation ended in failure, 2 on an error.

mod client;
mod login;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use metalrack_api::agent::EraseMode;
use metalrack_api::machines::{
    BrokenRequest, DeployRequest, MachineCreate, MachineState, MachineView, PowerCommand, PowerCommandRequest,
    ReleaseRequest, MACHINE_PAGE_MAX,
};
use metalrack_api::paths;
use metalrack_api::power::PowerParameters;

use crate::client::Client;
use crate::login::Login;

/// Manage a Metalrack region's machines and images.
#[derive(Debug, Parser)]
#[command(name = "metalrack", version, about = "Manage a Metalrack region's machines and images", long_about = None)]
struct Cli {
    /// The login file (default $XDG_CONFIG_HOME/metalrack/login.toml, ~/.config/... without it).
    #[arg(long, global = true, env = "METALRACK_LOGIN_FILE", value_name = "FILE")]
    login_file: Option<PathBuf>,
    /// `table` for people, `json` for scripts.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check URL and API_KEY against the region and save them for the other commands.
    Login(LoginArgs),
    /// Machines: list, show, add, commission, deploy, release, power.
    #[command(subcommand)]
    Machines(MachinesCommand),
    /// Images in the catalogue.
    #[command(subcommand)]
    Images(ImagesCommand),
}

#[derive(Debug, Args)]
struct LoginArgs {
    /// The region, e.g. https://REGION:5240/MAAS (HTTPS only: the API key goes in every request).
    url: String,
    /// Your API key (the region's account page, or `regiond apikey --username U`); `-` reads it
    /// from standard input's first line, keeping it out of `ps` and shell history.
    api_key: String,
    /// Trust the region if its certificate is in, or signed by one in, FILE (PEM).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "region_cert_sha256",
        required_unless_present = "region_cert_sha256"
    )]
    ca_cert: Option<PathBuf>,
    /// Trust exactly the region certificate with this SHA-256 (`regiond tls show` prints it).
    #[arg(long, value_name = "HEX")]
    region_cert_sha256: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ImagesCommand {
    /// Every image with its versions and files.
    List,
}

#[derive(Debug, Subcommand)]
enum MachinesCommand {
    /// Machines, a page at a time.
    List {
        /// Only machines in this state (new, ready, deployed, failed_deployment, ...).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One machine, with its inventory and progress (by id or MAC).
    Show { machine: String },
    /// Add a machine by its boot MAC and how to power it.
    Add(AddArgs),
    /// Learn the machine's hardware: power it on into the deploy environment, then off.
    Commission {
        machine: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Write an image to the machine's disk and boot it.
    Deploy {
        machine: String,
        /// Image name, e.g. debian/bookworm.
        #[arg(long)]
        image: String,
        #[arg(long, default_value = "amd64")]
        arch: String,
        /// The newest version when left out.
        #[arg(long)]
        version: Option<String>,
        /// Target disk (kernel name, e.g. vda); the first disk of the inventory when left out.
        #[arg(long)]
        disk: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Give the machine back: optionally erase its disk, power it off, make it Ready.
    Release {
        machine: String,
        #[arg(long, value_enum, default_value_t = Erase::None)]
        erase: Erase,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Power on, off, cycle, or query the machine's power state.
    Power {
        machine: String,
        #[arg(value_enum)]
        action: PowerArg,
    },
    /// Take the machine out of service, with a reason.
    MarkBroken {
        machine: String,
        #[arg(long)]
        reason: String,
    },
    /// Bring a broken machine back (as Ready if it was commissioned, else New).
    MarkFixed { machine: String },
    /// Stop what the machine is doing (commissioning, deploying, releasing).
    Abort { machine: String },
    /// Forget the machine.
    Delete { machine: String },
    /// The machine's events, newest first.
    Events { machine: String },
}

#[derive(Debug, Args)]
struct WaitArgs {
    /// Wait until the operation ends, showing progress; exit 1 if it failed.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds (exit 2).
    #[arg(long, default_value_t = 3600, value_name = "S")]
    wait_timeout_s: u64,
}

#[derive(Debug, Args)]
struct AddArgs {
    #[arg(long)]
    mac: String,
    #[arg(long, default_value = "")]
    hostname: String,
    /// The rack (id or name) whose network the machine boots from; optional with one rack.
    #[arg(long)]
    rack: Option<String>,
    #[arg(long, value_enum)]
    power_driver: Driver,
    /// Redfish: https://BMC[:PORT]; IPMI: the BMC's host name or address.
    #[arg(long, required_if_eq_any = [("power_driver", "redfish"), ("power_driver", "ipmi")])]
    power_address: Option<String>,
    #[arg(long, default_value = "")]
    power_user: String,
    /// The BMC password; read from the environment so it stays out of shell history and `ps`.
    #[arg(long, env = "METALRACK_POWER_PASSWORD", hide_env_values = true, default_value = "")]
    power_password: String,
    /// IPMI: the BMC's UDP port.
    #[arg(long, default_value_t = 623)]
    power_port: u16,
    /// Redfish: the Systems member to drive (the first when left out).
    #[arg(long)]
    power_system_id: Option<String>,
    /// Redfish over HTTPS: accept the BMC's own self-signed certificate.
    #[arg(long)]
    trust_self_signed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Driver {
    Redfish,
    Ipmi,
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Erase {
    None,
    Quick,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PowerArg {
    On,
    Off,
    Cycle,
    Query,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("metalrack: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let login_file = match cli.login_file {
        Some(path) => path,
        None => login::default_path()?,
    };
    if let Command::Login(args) = cli.command {
        // Said here in metalrack's words: the shared check speaks of imgtool's --url.
        if let Some(rest) = args.url.trim().strip_prefix("http://") {
            bail!(
                "{}: metalrack talks to the region over HTTPS only, so the API key never crosses the network \
                 in clear; use https://{rest} (the region serves HTTPS on the same port)",
                args.url.trim()
            );
        }
        let login = Login {
            url: args.url,
            api_key: api_key_argument(&args.api_key)?,
            ca_cert: args.ca_cert,
            region_cert_sha256: args.region_cert_sha256,
        };
        let account = Client::new(&login)?.account()?;
        login::save(&login_file, &login)?;
        println!("Logged in to {} as {}; saved in {}", login.url, account.username, login_file.display());
        return Ok(ExitCode::SUCCESS);
    }
    let client = Client::new(&login::load(&login_file)?)?;
    let output = cli.output;
    match cli.command {
        Command::Login(_) => unreachable!("handled above"),
        Command::Images(ImagesCommand::List) => {
            let images = client.images()?;
            if output == Output::Json {
                return print_json(&images);
            }
            println!("{:<32} {:<8} {:<12} {:>10}  FILES", "NAME", "ARCH", "VERSION", "SIZE");
            for image in &images {
                for version in &image.versions {
                    let kinds: Vec<&str> = version.files.iter().map(|f| f.kind.as_str()).collect();
                    println!(
                        "{:<32} {:<8} {:<12} {:>10}  {}",
                        image.name,
                        image.arch,
                        version.version,
                        HumanBytes(version.size_bytes).to_string(),
                        kinds.join(",")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Machines(command) => machines(&client, command, output),
    }
}

/// The API key `login` was given: itself, or standard input's first line for `-`.
fn api_key_argument(argument: &str) -> anyhow::Result<String> {
    if argument != "-" {
        return Ok(argument.to_owned());
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("cannot read the API key from standard input")?;
    let key = line.trim();
    if key.is_empty() {
        bail!("API key '-': standard input's first line is empty");
    }
    Ok(key.to_owned())
}

fn machines(client: &Client, command: MachinesCommand, output: Output) -> anyhow::Result<ExitCode> {
    match command {
        MachinesCommand::List { state, offset, limit } => {
            if let Some(state) = &state {
                if MachineState::parse(state).is_none() {
                    let words: Vec<&str> = MachineState::ALL.iter().map(|s| s.as_str()).collect();
                    bail!("--state {state:?} is not a state; one of {}", words.join(", "));
                }
            }
            let page = client.machines(state.as_deref(), offset, limit.min(MACHINE_PAGE_MAX))?;
            if output == Output::Json {
                return print_json(&page);
            }
            println!(
                "ID         HOSTNAME             MAC                STATE                POWER    RACK         IMAGE"
            );
            for machine in &page.machines {
                println!(
                    "{:<10} {:<20} {:<18} {:<20} {:<8} {:<12} {}",
                    machine.id,
                    machine.hostname,
                    machine.mac,
                    state_text(machine),
                    format!("{:?}", machine.power_state).to_lowercase(),
                    machine.rack_name.as_deref().unwrap_or("-"),
                    machine.image.as_ref().map(|i| format!("{} {} {}", i.image, i.arch, i.version)).unwrap_or_default()
                );
            }
            let shown = offset + page.machines.len() as u64;
            if shown < page.total {
                println!("({} of {}; --offset {shown} for more)", page.machines.len(), page.total);
            }
            Ok(ExitCode::SUCCESS)
        }
        MachinesCommand::Show { machine } => show(&client.machine(&machine)?, output),
        MachinesCommand::Add(args) => {
            let power = match args.power_driver {
                Driver::Redfish => PowerParameters::Redfish {
                    address: args.power_address.unwrap_or_default(),
                    username: args.power_user,
                    password: args.power_password,
                    system_id: args.power_system_id,
                    trust_self_signed: args.trust_self_signed,
                },
                Driver::Ipmi => PowerParameters::Ipmi {
                    address: args.power_address.unwrap_or_default(),
                    port: args.power_port,
                    username: args.power_user,
                    password: args.power_password,
                },
                Driver::Manual => PowerParameters::Manual,
            };
            let mac = args.mac.clone();
            client.add(&MachineCreate { hostname: args.hostname, mac: args.mac, power, rack: args.rack })?;
            show(&client.machine(&mac)?, output)
        }
        MachinesCommand::Commission { machine, wait } => {
            client.act(paths::MACHINE_COMMISSION, &machine, &serde_json::json!({}), "commissioning")?;
            finish(client, &machine, &wait, MachineState::Ready, output)
        }
        MachinesCommand::Deploy { machine, image, arch, version, disk, wait } => {
            let request = DeployRequest { image, arch, version, disk };
            client.act(paths::MACHINE_DEPLOY, &machine, &request, "deploying")?;
            finish(client, &machine, &wait, MachineState::Deployed, output)
        }
        MachinesCommand::Release { machine, erase, wait } => {
            let erase = match erase {
                Erase::None => EraseMode::None,
                Erase::Quick => EraseMode::Quick,
                Erase::Full => EraseMode::Full,
            };
            client.act(paths::MACHINE_RELEASE, &machine, &ReleaseRequest { erase }, "releasing")?;
            finish(client, &machine, &wait, MachineState::Ready, output)
        }
        MachinesCommand::Power { machine, action } => {
            let action = match action {
                PowerArg::On => PowerCommand::On,
                PowerArg::Off => PowerCommand::Off,
                PowerArg::Cycle => PowerCommand::Cycle,
                PowerArg::Query => PowerCommand::Query,
            };
            client.act(paths::MACHINE_POWER, &machine, &PowerCommandRequest { action }, "powering")?;
            show(&client.machine(&machine)?, output)
        }
        MachinesCommand::MarkBroken { machine, reason } => {
            client.act(paths::MACHINE_MARK_BROKEN, &machine, &BrokenRequest { reason }, "marking broken")?;
            show(&client.machine(&machine)?, output)
        }
        MachinesCommand::MarkFixed { machine } => {
            client.act(paths::MACHINE_MARK_FIXED, &machine, &serde_json::json!({}), "marking fixed")?;
            show(&client.machine(&machine)?, output)
        }
        MachinesCommand::Abort { machine } => {
            client.act(paths::MACHINE_ABORT, &machine, &serde_json::json!({}), "aborting")?;
            show(&client.machine(&machine)?, output)
        }
        MachinesCommand::Delete { machine } => {
            client.delete(&machine)?;
            if output == Output::Table {
                println!("Deleted {machine}");
            }
            Ok(ExitCode::SUCCESS)
        }
        MachinesCommand::Events { machine } => {
            let events = client.events(&machine)?;
            if output == Output::Json {
                return print_json(&events);
            }
            for event in &events {
                println!("{}  {:<22} {:<16} {}", event.at_ms, event.kind, event.actor, event.message);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// States an operation passes through; waiting ends at any other.
fn in_progress(state: MachineState) -> bool {
    matches!(
        state,
        MachineState::Commissioning | MachineState::Allocated | MachineState::Deploying | MachineState::Releasing
    )
}

/// After an action: show the machine, or with `--wait` follow it until the operation ends (a
/// progress bar while it deploys); exit 0 at `goal`, 1 at any other end.
fn finish(
    client: &Client,
    machine: &str,
    wait: &WaitArgs,
    goal: MachineState,
    output: Output,
) -> anyhow::Result<ExitCode> {
    if !wait.wait {
        return show(&client.machine(machine)?, output);
    }
    let deadline = Instant::now() + Duration::from_secs(wait.wait_timeout_s);
    let bar = if std::io::stderr().is_terminal() && output == Output::Table {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg:24} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}")
                .expect("a valid template"),
        );
        Some(bar)
    } else {
        None
    };
    let view = loop {
        let view = client.machine(machine)?;
        if let Some(bar) = &bar {
            bar.set_message(state_text(&view));
            if let Some(progress) = &view.progress {
                bar.set_length(progress.bytes_total);
                bar.set_position(progress.bytes_done);
            }
        }
        if !in_progress(view.state) {
            break view;
        }
        if Instant::now() >= deadline {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            bail!("{machine} is still {} after {} s", view.state.label(), wait.wait_timeout_s);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    show(&view, output)?;
    if view.state == goal {
        Ok(ExitCode::SUCCESS)
    } else {
        if output == Output::Table {
            eprintln!("metalrack: {machine} ended {}: {}", view.state.label(), view.status_message);
        }
        Ok(ExitCode::from(1))
    }
}

fn state_text(machine: &MachineView) -> String {
    match (machine.state, machine.queue_position, &machine.progress) {
        (MachineState::Allocated, Some(position), _) => format!("Allocated (queue {position})"),
        (MachineState::Deploying, _, Some(p)) if p.bytes_total > 0 => {
            format!("Deploying {}%", p.bytes_done * 100 / p.bytes_total)
        }
        (state, _, _) => state.label().to_owned(),
    }
}

fn show(machine: &MachineView, output: Output) -> anyhow::Result<ExitCode> {
    if output == Output::Json {
        return print_json(machine);
    }
    println!("id:        {}", machine.id);
    println!("hostname:  {}", machine.hostname);
    println!("mac:       {}", machine.mac);
    println!("state:     {}", state_text(machine));
    if !machine.status_message.is_empty() {
        println!("status:    {}", machine.status_message);
    }
    println!("rack:      {}", machine.rack_name.as_deref().unwrap_or("-"));
    let power = machine.power.as_ref().map(|p| format!("{:?}", p.driver).to_lowercase()).unwrap_or("-".into());
    println!("power:     {} ({power})", format!("{:?}", machine.power_state).to_lowercase());
    if let Some(image) = &machine.image {
        let disk = machine.disk.as_deref().unwrap_or("first disk");
        println!("image:     {} {} {} on {disk}", image.image, image.arch, image.version);
    }
    if let Some(p) = &machine.progress {
        println!(
            "progress:  {:?}: {} of {} ({} written, {} skipped, {}/s)",
            p.phase,
            HumanBytes(p.bytes_done),
            HumanBytes(p.bytes_total),
            HumanBytes(p.bytes_written),
            HumanBytes(p.bytes_skipped),
            HumanBytes(p.rate_bytes_per_s)
        );
    }
    if let Some(inventory) = &machine.inventory {
        println!(
            "hardware:  {} CPUs ({}), {} memory, {:?} firmware",
            inventory.cpus,
            inventory.cpu_model,
            HumanBytes(inventory.memory_bytes),
            inventory.firmware
        );
        for disk in &inventory.disks {
            println!(
                "  disk {:<8} {:>10}  {} {}",
                disk.name,
                HumanBytes(disk.size_bytes).to_string(),
                disk.model,
                disk.serial
            );
        }
        for nic in &inventory.nics {
            let speed = nic.speed_mbps.map(|s| format!("{s} Mb/s")).unwrap_or_default();
            println!("  nic  {:<8} {}  {speed}", nic.name, nic.mac);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<ExitCode> {
    let text = serde_json::to_string_pretty(value).context("cannot print JSON")?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}
