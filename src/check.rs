//! `vero-proxy check [--connect]`: validate configuration and identity without serving, and
//! print a report a person can act on.

use crate::cli::CheckArgs;

/// Runs the check; `Ok(true)` when all is well.
pub async fn run(_args: &CheckArgs) -> anyhow::Result<bool> {
    anyhow::bail!("check is not built yet")
}
