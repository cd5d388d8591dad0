//! `imgtool`: chunk image files into manifests, inspect and compare manifests, verify files.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use metalrack_image_tools::chunker::{self, ChunkerConfig};
use metalrack_image_tools::manifest::{self, Manifest};
use metalrack_image_tools::{diff, verify};

mod deploy_env;
mod push;
use metalrack_imgtool::tls;

/// The largest valid manifest (CHUNKS_MAX entries, 144 MiB): reading stops past it, so a wrong
/// path (a disk image instead of its manifest) fails at once instead of filling memory.
const MANIFEST_BYTES_MAX: u64 = (manifest::HEADER_LEN + manifest::CHUNKS_MAX as usize * manifest::ENTRY_LEN) as u64;

/// Metalrack image tool: content-defined chunking for images that move between a region and
/// its racks.
///
/// An image file is cut into chunks (FastCDC, 64 KiB on average) whose boundaries follow the
/// content, so a new version of an image shares most chunks with the old one. Its manifest
/// lists each chunk's BLAKE3 hash and length in order, plus the whole file's hash; uploads and
/// syncs move only the chunks the other side lacks.
#[derive(Debug, Parser)]
#[command(name = "imgtool", version, after_long_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  imgtool chunk jammy-v2.img -o jammy-v2.manifest     cut an image into chunks, write its manifest
  imgtool inspect jammy-v2.manifest --chunks          show the manifest, one line per chunk
  imgtool diff jammy-v1.manifest jammy-v2.manifest    what an update from v1 to v2 would move
  imgtool verify jammy-v2.img jammy-v2.manifest       check a downloaded or written image
  imgtool push jammy-v2.img --name ubuntu/jammy --arch amd64 --kind root-disk \\
    --url https://REGION:5240/MAAS --ca-cert cert.pem --api-key KEY
                                                      upload, trusting the region's cert.pem

Exit status: 0 on success, 2 on any error (including a file that does not verify).";

#[derive(Debug, Subcommand)]
enum Command {
    Chunk(ChunkArgs),
    Inspect(InspectArgs),
    Diff(DiffArgs),
    Verify(VerifyArgs),
    // Subcommands that live in their own module (`push` in src/push.rs) go below this line,
    // each with one arm in `run`.
    Push(PushArgs),
    #[command(subcommand)]
    DeployEnv(DeployEnvCommand),
}

/// The deploy environment machines boot to be commissioned, deployed and released.
#[derive(Debug, Subcommand)]
enum DeployEnvCommand {
    Build(DeployEnvBuildArgs),
}

/// Build the deploy environment (kernel and initrd) into OUT, and optionally push it.
///
/// Downloads Debian's cloud kernel and busybox-static with apt-get (once: they stay in the
/// cache), and writes OUT/kernel and OUT/initrd: busybox, the virtio modules, an init that
/// brings up the boot NIC with DHCP, and the static agent. Two builds from the same packages and
/// agent are identical. With --push, both files go to the catalogue as image
/// metalrack/deploy-env (kinds kernel and initrd).
#[derive(Debug, Args)]
struct DeployEnvBuildArgs {
    /// Where to write `kernel` and `initrd`.
    #[arg(long)]
    out: PathBuf,
    /// The static agent binary (scripts/build-deploy-env builds it there).
    #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release/metalrack-agent")]
    agent: PathBuf,
    /// Where downloaded packages are kept between builds.
    #[arg(long, default_value = "target/deploy-env-cache")]
    cache: PathBuf,
    /// Also push both files to the region's catalogue.
    #[arg(long)]
    push: bool,
    /// The version to push under (default: the UTC time now, YYYYMMDDHHMMSS).
    #[arg(long, requires = "push")]
    version: Option<String>,
    /// The region, e.g. https://REGION:5240/MAAS (with --push).
    #[arg(long, env = "METALRACK_URL", requires = "push")]
    url: Option<String>,
    /// Your API key (with --push).
    #[arg(long, env = "METALRACK_API_KEY", hide_env_values = true, requires = "push")]
    api_key: Option<String>,
    /// Trust the region's certificate in FILE (PEM), as for `imgtool push` (with --push).
    #[arg(long, env = "METALRACK_CA_CERT", value_name = "FILE", requires = "push")]
    ca_cert: Option<PathBuf>,
    /// Trust exactly the region certificate with this SHA-256 (with --push).
    #[arg(long, env = "METALRACK_REGION_CERT_SHA256", value_name = "HEX", requires = "push")]
    region_cert_sha256: Option<String>,
}

/// The catalogue image the deploy environment is pushed as.
const DEPLOY_ENV_IMAGE: &str = "metalrack/deploy-env";

/// Upload FILE into the region's catalogue as IMAGE VERSION's file of KIND.
///
/// Sends the manifest first; the region answers which chunks it lacks and only those cross the
/// network. An interrupted push resumes when run again: chunks already sent are not resent.
#[derive(Debug, Args)]
struct PushArgs {
    /// The file to upload (kernel, initrd, raw disk image or squashfs).
    file: PathBuf,
    /// Image name, e.g. ubuntu/jammy or custom/windows-2016.
    #[arg(long)]
    name: String,
    /// Architecture, e.g. amd64 or arm64.
    #[arg(long)]
    arch: String,
    /// What the file is: kernel, initrd, root-disk or squashfs.
    #[arg(long)]
    kind: String,
    /// Version; files pushed under one version form one image version. Default: the UTC time
    /// now, as YYYYMMDDHHMMSS.
    #[arg(long)]
    version: Option<String>,
    /// The region, e.g. https://REGION:5240/MAAS (HTTPS only: the API key goes in every request).
    #[arg(long, env = "METALRACK_URL")]
    url: String,
    /// Your API key (the region's account page, or `regiond apikey --username U`).
    #[arg(long, env = "METALRACK_API_KEY", hide_env_values = true)]
    api_key: String,
    #[command(flatten)]
    trust: TrustArgs,
}

/// How to trust the region's certificate: one of the two.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct TrustArgs {
    /// Trust the region if its certificate is in, or signed by one in, FILE (PEM): a copy of the
    /// region's /var/lib/metalrack/region/tls/cert.pem, or the authority of your own certificate.
    /// The URL's host must be one the certificate names.
    #[arg(long, env = "METALRACK_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Trust exactly the region certificate with this SHA-256, whatever names it holds:
    /// `regiond tls show` on the region prints it (the region also logs it at start).
    #[arg(long, env = "METALRACK_REGION_CERT_SHA256", value_name = "HEX")]
    region_cert_sha256: Option<String>,
}

/// Cut FILE into content-defined chunks and write its manifest to OUT.
///
/// Reads FILE once, in constant memory whatever its size. Two versions of an image share
/// chunks only if both were chunked with the same sizes, so keep the defaults unless you have
/// measured a reason.
#[derive(Debug, Args)]
struct ChunkArgs {
    /// The image file to chunk.
    file: PathBuf,
    /// Where to write the manifest (usually FILE with a .manifest extension).
    #[arg(short, long = "output", value_name = "OUT")]
    output: PathBuf,
    /// Minimum chunk length in KiB.
    #[arg(long, value_name = "KIB", default_value_t = 16)]
    min_kib: u32,
    /// Average chunk length in KiB: smaller finds more sharing, at more chunks per GiB.
    #[arg(long, value_name = "KIB", default_value_t = 64)]
    avg_kib: u32,
    /// Maximum chunk length in KiB (at most 16384).
    #[arg(long, value_name = "KIB", default_value_t = 256)]
    max_kib: u32,
}

/// Show a manifest: file length and hash, chunk count and sizes.
#[derive(Debug, Args)]
struct InspectArgs {
    /// The manifest file.
    manifest: PathBuf,
    /// Also list every chunk: index, byte offset, length, hash.
    #[arg(long)]
    chunks: bool,
}

/// Compare two manifests: which chunks of NEW are already in OLD, and what would move.
#[derive(Debug, Args)]
struct DiffArgs {
    /// The manifest of the version the other side already has.
    old: PathBuf,
    /// The manifest of the version to send.
    new: PathBuf,
}

/// Check FILE against MANIFEST: length, every chunk in order, and the whole-file hash.
///
/// Prints "ok" and exits 0 if FILE matches; otherwise names the first bad chunk and its byte
/// offset and exits 2.
#[derive(Debug, Args)]
struct VerifyArgs {
    /// The file to check.
    file: PathBuf,
    /// Its manifest.
    manifest: PathBuf,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        // The reader went away (`imgtool inspect --chunks m | head`): nothing left to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgtool: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Chunk(args) => chunk(args),
        Command::Inspect(args) => inspect(args),
        Command::Diff(args) => diff(args),
        Command::Verify(args) => verify(args),
        Command::Push(args) => push_command(args),
        Command::DeployEnv(DeployEnvCommand::Build(args)) => deploy_env_build(args),
    }
}

fn deploy_env_build(args: DeployEnvBuildArgs) -> anyhow::Result<ExitCode> {
    let built =
        deploy_env::build(&deploy_env::BuildOptions { out: &args.out, agent: &args.agent, cache: &args.cache })?;
    println!(
        "deploy environment: kernel {} ({}), initrd {} ({}), modules {}",
        built.kernel.display(),
        built.kernel_version,
        built.initrd.display(),
        HumanBytes(std::fs::metadata(&built.initrd)?.len()),
        built.modules.join(" ")
    );
    if !args.push {
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(url), Some(api_key)) = (args.url.as_deref(), args.api_key.as_deref()) else {
        bail!("--push needs --url and --api-key (or METALRACK_URL and METALRACK_API_KEY)");
    };
    if args.ca_cert.is_none() == args.region_cert_sha256.is_none() {
        bail!("--push needs exactly one of --ca-cert and --region-cert-sha256");
    }
    let region_certificate = tls::RegionCertificate::from_options(args.ca_cert, args.region_cert_sha256.as_deref())?;
    let version = args.version.unwrap_or_else(default_version);
    for (kind, file) in [("kernel", &built.kernel), ("initrd", &built.initrd)] {
        let summary = push::push(&push::PushArgs {
            file,
            name: DEPLOY_ENV_IMAGE,
            arch: "amd64",
            kind,
            version: &version,
            url,
            api_key,
            region_certificate: &region_certificate,
            config: ChunkerConfig::default(),
        })?;
        println!(
            "{} {} version {}: {} committed, {} bytes sent",
            summary.commit.image, summary.commit.arch, summary.commit.version, summary.commit.kind, summary.bytes_sent
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The UTC time now as YYYYMMDDHHMMSS: the default version of a push.
fn default_version() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, secs) = ((now / 86_400) as i64, now % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}{:02}{:02}{:02}", secs / 3600, secs % 3600 / 60, secs % 60)
}

fn push_command(args: PushArgs) -> anyhow::Result<ExitCode> {
    let version = args.version.clone().unwrap_or_else(default_version);
    let region_certificate =
        tls::RegionCertificate::from_options(args.trust.ca_cert.clone(), args.trust.region_cert_sha256.as_deref())?;
    let summary = push::push(&push::PushArgs {
        file: &args.file,
        name: &args.name,
        arch: &args.arch,
        kind: &args.kind,
        version: &version,
        url: &args.url,
        api_key: &args.api_key,
        region_certificate: &region_certificate,
        config: ChunkerConfig::default(),
    })?;
    println!(
        "{} {} version {}: {} committed ({}), {} of {} chunks sent, {} bytes sent, {:.1} s (chunking {:.1} s, sending {:.1} s, commit {:.1} s)",
        summary.commit.image,
        summary.commit.arch,
        summary.commit.version,
        summary.commit.kind,
        HumanBytes(summary.file_len),
        summary.n_chunks_sent,
        summary.n_chunks,
        summary.bytes_sent,
        summary.elapsed.as_secs_f64(),
        summary.phases.chunking.as_secs_f64(),
        summary.phases.sending.as_secs_f64(),
        summary.phases.commit.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn chunk(args: ChunkArgs) -> anyhow::Result<ExitCode> {
    let kib =
        |name: &str, value: u32| value.checked_mul(1024).with_context(|| format!("--{name} {value} is too large"));
    let config = ChunkerConfig {
        min_len: kib("min-kib", args.min_kib)?,
        avg_len: kib("avg-kib", args.avg_kib)?,
        max_len: kib("max-kib", args.max_kib)?,
    };
    config.validate()?;
    // Only sizes the progress bar; a block device reports 0 and gets a counter instead.
    let total = std::fs::metadata(&args.file).ok().map(|m| m.len()).filter(|&len| len > 0);
    let bar = progress_bar(total);
    let result = chunker::chunk_file(&args.file, config, |done| bar.set_position(done));
    bar.finish_and_clear();
    let manifest = result.with_context(|| format!("chunking {}", args.file.display()))?;
    std::fs::write(&args.output, manifest.to_bytes())
        .with_context(|| format!("cannot write the manifest to {}", args.output.display()))?;
    writeln!(
        io::stdout(),
        "{}: {} chunks, {} bytes ({}), file hash {}",
        args.output.display(),
        manifest.chunks.len(),
        manifest.file_len,
        HumanBytes(manifest.file_len),
        manifest.file_hash
    )?;
    Ok(ExitCode::SUCCESS)
}

fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let manifest = read_manifest(&args.manifest)?;
    let mut out = BufWriter::new(io::stdout().lock());
    writeln!(out, "file length   {} bytes ({})", manifest.file_len, HumanBytes(manifest.file_len))?;
    writeln!(out, "file hash     {}", manifest.file_hash)?;
    writeln!(out, "chunks        {}", manifest.chunks.len())?;
    let lens = manifest.chunks.iter().map(|chunk| chunk.len);
    if let (Some(min), Some(max)) = (lens.clone().min(), lens.max()) {
        let avg = manifest.file_len / manifest.chunks.len() as u64;
        writeln!(out, "chunk length  min {min}, avg {avg}, max {max} bytes")?;
    }
    if args.chunks {
        writeln!(out)?;
        writeln!(out, "{:>8} {:>14} {:>9}  hash", "index", "offset", "length")?;
        for (index, (offset, chunk)) in manifest.chunk_offsets().enumerate() {
            writeln!(out, "{index:>8} {offset:>14} {:>9}  {}", chunk.len, chunk.hash)?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn diff(args: DiffArgs) -> anyhow::Result<ExitCode> {
    let old = read_manifest(&args.old)?;
    let new = read_manifest(&args.new)?;
    let result = diff::diff(&old, &new);
    let mut out = io::stdout().lock();
    writeln!(out, "old       {} chunks, {} bytes  {}", result.chunks_old, old.file_len, args.old.display())?;
    writeln!(out, "new       {} chunks, {} bytes  {}", result.chunks_new, new.file_len, args.new.display())?;
    writeln!(
        out,
        "shared    {} distinct chunks, {} bytes ({}) already in old",
        result.chunks_shared,
        result.bytes_reused,
        HumanBytes(result.bytes_reused)
    )?;
    // Percent of the new file; an empty new file moves nothing.
    let percent = if result.bytes_new_file == 0 {
        0.0
    } else {
        result.bytes_to_move as f64 * 100.0 / result.bytes_new_file as f64
    };
    writeln!(
        out,
        "to move   {} distinct chunks, {} bytes ({}), {percent:.1}% of the new file",
        result.chunks_to_move,
        result.bytes_to_move,
        HumanBytes(result.bytes_to_move)
    )?;
    if old.file_hash == new.file_hash {
        writeln!(out, "the files are identical")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let manifest = read_manifest(&args.manifest)?;
    let bar = progress_bar(Some(manifest.file_len));
    let result = verify::verify_file(&args.file, &manifest, |done| bar.set_position(done));
    bar.finish_and_clear();
    result.with_context(|| format!("verifying {} against {}", args.file.display(), args.manifest.display()))?;
    writeln!(io::stdout(), "ok")?;
    Ok(ExitCode::SUCCESS)
}

/// Reads and parses a manifest, refusing to read more than the largest valid one.
fn read_manifest(path: &Path) -> anyhow::Result<Manifest> {
    let file = File::open(path).with_context(|| format!("cannot open manifest {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MANIFEST_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read manifest {}", path.display()))?;
    if bytes.len() as u64 > MANIFEST_BYTES_MAX {
        bail!("{} is larger than any manifest ({MANIFEST_BYTES_MAX} bytes); is it the image itself?", path.display());
    }
    Manifest::parse(&bytes).with_context(|| format!("reading manifest {}", path.display()))
}

/// A byte progress bar on stderr, or a hidden one when stderr is not a terminal (logs and
/// pipes get no control characters).
fn progress_bar(total: Option<u64>) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("valid progress template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {binary_bytes} {binary_bytes_per_sec}")
                .expect("valid progress template"),
        ),
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn test_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_chunk_defaults_match_the_library() {
        let cli = Cli::try_parse_from(["imgtool", "chunk", "f", "-o", "m"]).unwrap();
        let Command::Chunk(args) = cli.command else { panic!("not chunk") };
        let defaults = ChunkerConfig::default();
        assert_eq!(
            (args.min_kib * 1024, args.avg_kib * 1024, args.max_kib * 1024),
            (defaults.min_len, defaults.avg_len, defaults.max_len)
        );
    }
}
