//! Parse the command line, start logging, hand over to a subcommand.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vero_proxy::cli::{Cli, Command, LogFormat};

fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("VERO_PROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Demo(args)) => {
            init_logging(LogFormat::Text);
            vero_proxy::demo::run(args).await
        }
        Some(Command::Run(args)) => run(*args).await,
        None => run(cli.run).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vero-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(mut args: vero_proxy::cli::RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    // Deliberately an environment variable and never a flag: a flag would show in `ps`.
    args.pkcs12_password_env = std::env::var("VERO_PROXY_PKCS12_PASSWORD")
        .ok()
        .map(zeroize::Zeroizing::new);
    let cfg = vero_proxy::config::Config::from_args(&args)?;
    vero_proxy::app::run(cfg).await
}
