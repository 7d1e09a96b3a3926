//! `vero-proxy cert ...`: the certificate lifecycle (inspect, first retrieval, renewal) through
//! the Tax Administration's certificate service.

pub mod inspect;
pub mod renew;
pub mod request;

use clap::{Args, Subcommand};

/// Flags of `vero-proxy cert`.
#[derive(Debug, Args)]
pub struct CertArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CertCommand,
}

/// The `cert` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Show what a certificate is: subject, issuing Tax Administration CA, validity, renewal
    /// window, whether a key matches. Reads PEM, PKCS#12 or a running proxy's /status.
    Inspect(Box<inspect::InspectArgs>),
    /// Get the first certificate with a one-time transfer ID and password.
    Request(Box<request::RequestArgs>),
    /// Renew the certificate in service into a staging directory.
    Renew(Box<renew::RenewArgs>),
}

/// Runs a `cert` subcommand; Ok(false) means "done, but the answer is no" (exit 1).
pub async fn run(args: CertArgs) -> anyhow::Result<bool> {
    match args.command {
        CertCommand::Inspect(a) => inspect::run(*a).await,
        CertCommand::Request(a) => request::run(*a).await.map(|()| true),
        CertCommand::Renew(a) => renew::run(*a).await.map(|()| true),
    }
}
