//! `vero-proxy cert request` (being built).

use clap::Args;

/// Flags of `vero-proxy cert request`.
#[derive(Debug, Clone, Args)]
pub struct RequestArgs {}

/// Runs `cert request`.
pub async fn run(_args: RequestArgs) -> anyhow::Result<()> {
    anyhow::bail!("cert request is not built yet")
}
