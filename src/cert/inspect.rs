//! `vero-proxy cert inspect FILE...`: what a certificate is, for a person or a script: subject,
//! issuer, which Tax Administration CA issued it, serial, validity, days left, the renewal
//! window, fingerprint, key, the chain that would be sent, and whether a key belongs to it.
//! Reads PEM, DER, PKCS#12, identity directories, and a running proxy's admin `/status`.

mod facts;
mod read;
mod render;
mod status;

use std::path::PathBuf;
use std::time::SystemTime;

use clap::Args;
use zeroize::Zeroizing;

use crate::identity::{unix, Thresholds};

pub use facts::{CertFacts, Inspected, KeyCheck};

/// Flags of `vero-proxy cert inspect`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Exit status: 0 when every certificate shown is valid now and every key checked matches its \
certificate; 1 when an input cannot be read, a certificate has expired or is not valid yet, or a \
key does not match (or cannot be read). With --fail-within DAYS, also 1 when a certificate \
expires within DAYS days, like `openssl x509 -checkend` but in days: `--fail-within 60` asks \
\"is the renewal window open?\", for monitoring.

The renewal window opens --renewal-warning-days (60) before notAfter, when the Tax \
Administration's certificate service starts accepting renewals; from --renewal-critical-days \
(14) on it is \"closing soon\". An expired certificate cannot be renewed.")]
pub struct InspectArgs {
    /// What to inspect: PEM files (a chain, possibly with its key), DER certificates, PKCS#12
    /// files (.p12/.pfx), identity directories (cert.pem + key.pem or tls.crt + tls.key) or a
    /// directory of them (--identities-dir), `-` for standard input, or a running proxy's
    /// admin status URL, e.g. http://127.0.0.1:9901/status (loopback only).
    #[arg(required = true, value_name = "FILE")]
    pub inputs: Vec<String>,

    /// Check whether the private key in this PEM file belongs to each input's certificate.
    #[arg(long, value_name = "PATH")]
    pub key: Option<PathBuf>,

    /// File holding the password of an encrypted PKCS#8 key (first line).
    #[arg(long, value_name = "PATH")]
    pub key_password_file: Option<PathBuf>,

    /// File holding the password of a PKCS#12 input (first line). Without it, the environment
    /// variable VERO_PROXY_PKCS12_PASSWORD is used; there is no flag for the password itself.
    #[arg(long, value_name = "PATH")]
    pub pkcs12_password_file: Option<PathBuf>,

    /// Also exit 1 when a certificate expires within DAYS days (60: the renewal window is open).
    #[arg(long, value_name = "DAYS")]
    pub fail_within: Option<u32>,

    /// Days before expiry at which the renewal window opens.
    #[arg(long, default_value_t = 60, value_name = "DAYS")]
    pub renewal_warning_days: u32,

    /// Days before expiry from which renewal is urgent.
    #[arg(long, default_value_t = 14, value_name = "DAYS")]
    pub renewal_critical_days: u32,

    /// Print JSON instead of the report: one object with an `inputs` array and `ok`.
    #[arg(long)]
    pub json: bool,
}

/// What the readers need besides the input itself.
pub(crate) struct Options {
    key: Option<PathBuf>,
    key_password_file: Option<PathBuf>,
    pkcs12_password: Option<(Zeroizing<String>, String)>,
    pkcs12_password_error: Option<String>,
}

/// Runs `cert inspect`; `Ok(false)` (exit 1) when something is wrong, as the help says.
pub async fn run(args: InspectArgs) -> anyhow::Result<bool> {
    let opts = options(&args);
    let now = unix(SystemTime::now());
    let thresholds = Thresholds {
        warning_days: args.renewal_warning_days,
        critical_days: args.renewal_critical_days,
    };
    let mut all = Vec::new();
    for input in &args.inputs {
        if status::is_url(input) {
            all.push(status::inspect(input).await);
        } else {
            all.extend(read::expand(input).iter().map(|i| read::inspect(i, &opts)));
        }
    }
    for inspected in &mut all {
        inspected.judge(now, args.fail_within);
    }
    let ok = all.iter().all(|i| i.problems.is_empty());
    let out = if args.json {
        format!("{}\n", render::json(&all, now, thresholds, ok))
    } else {
        render::text(&all, now, thresholds, color())
    };
    // A reader that goes away (`| head`) ends the output quietly, as with other tools.
    use std::io::Write;
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    Ok(ok)
}

fn options(args: &InspectArgs) -> Options {
    let (pkcs12_password, pkcs12_password_error) = match &args.pkcs12_password_file {
        Some(p) => match crate::identity::source::read_password_file(p) {
            Ok(pw) => (Some((pw, format!("from {}", p.display()))), None),
            Err(e) => (None, Some(format!("cannot read {}: {e}", p.display()))),
        },
        // Deliberately an environment variable and never a flag: a flag would show in `ps`.
        None => (
            std::env::var("VERO_PROXY_PKCS12_PASSWORD")
                .ok()
                .map(|pw| (Zeroizing::new(pw), "from VERO_PROXY_PKCS12_PASSWORD".into())),
            None,
        ),
    };
    Options {
        key: args.key.clone(),
        key_password_file: args.key_password_file.clone(),
        pkcs12_password,
        pkcs12_password_error,
    }
}

/// Colour only for a person at a terminal, never into files or pipes.
fn color() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}
