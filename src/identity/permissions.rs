//! The ssh-style check on the private key file's permissions.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A warning when the key file is readable by others, or by a group this process is not in.
/// A Kubernetes Secret mounted with `fsGroup` and mode 0440 is readable by the process's own
/// group, and draws no warning.
pub fn check(key: &Path) -> Option<String> {
    let meta = std::fs::metadata(key).ok()?;
    let mode = meta.mode() & 0o777;
    if mode & 0o004 != 0 {
        return Some(format!(
            "the private key {} is readable by every user on this machine (mode {mode:04o}); run chmod 600 on it",
            key.display()
        ));
    }
    if mode & 0o040 != 0 && !own_groups().contains(&meta.gid()) {
        return Some(format!(
            "the private key {} is readable by group {} (mode {mode:04o}), which this process is not in; run chmod 600 on it or give it the proxy's group",
            key.display(),
            meta.gid()
        ));
    }
    None
}

/// The process's real and supplementary group ids, from /proc (Linux).
fn own_groups() -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Gid:") {
            groups.extend(
                rest.split_whitespace()
                    .take(2)
                    .filter_map(|g| g.parse::<u32>().ok()),
            );
        } else if let Some(rest) = line.strip_prefix("Groups:") {
            groups.extend(
                rest.split_whitespace()
                    .filter_map(|g| g.parse::<u32>().ok()),
            );
        }
    }
    groups
}
