//! `vero-proxy cert inspect` (being built).

use clap::Args;

/// Flags of `vero-proxy cert inspect`.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {}

/// Runs `cert inspect`.
pub async fn run(_args: InspectArgs) -> anyhow::Result<bool> {
    anyhow::bail!("cert inspect is not built yet")
}
