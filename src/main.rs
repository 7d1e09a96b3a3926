//! Parse the command line, start logging, hand over to a subcommand.

use tracing_subscriber::EnvFilter;
use vero_proxy::cli::{Command, LogFormat};
use vero_proxy::config_file::{self, ParseError};

// glibc's malloc costs about as much per request as parsing one header block: a proxy allocates
// and frees a dozen small buffers per request (bench/instructions.sh counted it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Info, but not the file-watch library's own notes (a watch removed with its directory).
const DEFAULT_FILTER: &str = "info,notify=warn";

fn init_logging(format: LogFormat, level: Option<&str>) {
    use std::io::IsTerminal;
    let wanted = level
        .map(str::to_owned)
        .or_else(|| std::env::var("VERO_PROXY_LOG").ok())
        .or_else(|| std::env::var("RUST_LOG").ok());
    // A typo must not silence the proxy: fall back to info and say so.
    let (filter, rejected) = match wanted.as_deref().map(EnvFilter::try_new) {
        Some(Ok(f)) => (f, None),
        Some(Err(e)) => (
            EnvFilter::new(DEFAULT_FILTER),
            wanted.clone().map(|w| (w, e)),
        ),
        None => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    // Colours only for a person at a terminal, never into journald, docker logs or files.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(vero_proxy::log_time::Utc)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    if let Some((w, e)) = rejected {
        tracing::warn!("log level {w:?} is not understood ({e}); logging at info");
    }
}

fn main() -> std::process::ExitCode {
    // One scheduler thread per CPU this process may use. Given one CPU (a sidecar with a CPU
    // limit of 1, or pinned), a single-threaded scheduler does the same work without the
    // work-stealing scheduler's atomics and queues.
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1);
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    match builder.enable_all().build() {
        Ok(rt) => rt.block_on(async_main()),
        Err(e) => {
            eprintln!("vero-proxy: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn async_main() -> std::process::ExitCode {
    // Flags, environment and the --config file, merged; clap's errors, --help and --version
    // print and exit as clap does.
    let argv = std::env::args_os().collect();
    let (cli, from_file) = match config_file::parse(argv, |p| std::fs::read_to_string(p)) {
        Ok(parsed) => parsed,
        Err(ParseError::Clap(e)) => e.exit(),
        Err(ParseError::File(e)) => {
            eprintln!("vero-proxy: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::Demo(args)) => {
            init_logging(LogFormat::Text, None);
            vero_proxy::demo::run(args).await
        }
        Some(Command::Run(args)) => run(*args, from_file).await,
        Some(Command::Check(args)) => {
            init_logging(LogFormat::Text, Some("warn"));
            let mut args = args;
            args.run.pkcs12_password_env = std::env::var("VERO_PROXY_PKCS12_PASSWORD")
                .ok()
                .map(zeroize::Zeroizing::new);
            match vero_proxy::check::run(&args).await {
                Ok(true) => return std::process::ExitCode::SUCCESS,
                Ok(false) => return std::process::ExitCode::FAILURE,
                Err(e) => Err(e),
            }
        }
        Some(Command::Cert(args)) => {
            init_logging(LogFormat::Text, Some("warn"));
            match vero_proxy::cert::run(args).await {
                Ok(true) => return std::process::ExitCode::SUCCESS,
                Ok(false) => return std::process::ExitCode::FAILURE,
                Err(e) => Err(e),
            }
        }
        None => run(cli.run, from_file).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vero-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(
    mut args: vero_proxy::cli::RunArgs,
    from_file: Option<config_file::FromFile>,
) -> anyhow::Result<()> {
    init_logging(args.log_format, args.log_level.as_deref());
    // Deliberately an environment variable and never a flag: a flag would show in `ps`.
    args.pkcs12_password_env = std::env::var("VERO_PROXY_PKCS12_PASSWORD")
        .ok()
        .map(zeroize::Zeroizing::new);
    let cfg = vero_proxy::config::Config::from_args(&args).map_err(|e| match &from_file {
        Some(f) => anyhow::anyhow!(f.explain(&e.0)),
        None => e.into(),
    })?;
    vero_proxy::app::run(cfg).await
}
