//! `vero-proxy cert renew` (being built).

use clap::Args;

/// Flags of `vero-proxy cert renew`.
#[derive(Debug, Clone, Args)]
pub struct RenewArgs {}

/// Runs `cert renew`.
pub async fn run(_args: RenewArgs) -> anyhow::Result<()> {
    anyhow::bail!("cert renew is not built yet")
}
