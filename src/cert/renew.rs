//! `vero-proxy cert renew`: a new certificate for a new key, the request signed with the
//! certificate in service, written to a staging directory (never over the identity in service).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Args;

use super::request::{print_done, ServiceArgs};
use crate::certsvc;
use crate::identity::{IdentityError, IdentitySource, Password};

/// Flags of `vero-proxy cert renew`.
#[derive(Debug, Clone, Args)]
pub struct RenewArgs {
    /// The service, the customer and the staging directory (--out) for the new pair.
    #[command(flatten)]
    pub service: ServiceArgs,

    /// The current certificate (PEM), as for `run`.
    #[arg(long, env = "VERO_PROXY_CERT")]
    pub cert: Option<PathBuf>,

    /// The current key (PEM), as for `run`.
    #[arg(long, env = "VERO_PROXY_KEY")]
    pub key: Option<PathBuf>,

    /// Directory of the current identity (cert.pem + key.pem or tls.crt + tls.key), as for `run`.
    #[arg(long, env = "VERO_PROXY_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,

    /// The current identity as PKCS#12, as for `run` (password from --pkcs12-password-file or
    /// VERO_PROXY_PKCS12_PASSWORD).
    #[arg(long, env = "VERO_PROXY_PKCS12")]
    pub pkcs12: Option<PathBuf>,

    /// File whose first line is the PKCS#12 password.
    #[arg(long, env = "VERO_PROXY_PKCS12_PASSWORD_FILE")]
    pub pkcs12_password_file: Option<PathBuf>,

    /// File whose first line is the password of an encrypted PKCS#8 key.
    #[arg(long, env = "VERO_PROXY_KEY_PASSWORD_FILE")]
    pub key_password_file: Option<PathBuf>,
}

/// The current identity's source, with the same rules `run` applies.
// config.rs has the same mapping for RunArgs, private there; a shared flag struct would let
// both use one function.
fn source(a: &RenewArgs) -> anyhow::Result<IdentitySource> {
    let given = [
        a.cert.is_some(),
        a.identity_dir.is_some(),
        a.pkcs12.is_some(),
    ];
    match given.iter().filter(|g| **g).count() {
        0 => anyhow::bail!(
            "the current certificate is required to sign the renewal: --cert PATH (with --key \
             PATH), --identity-dir DIR or --pkcs12 PATH"
        ),
        1 => {}
        _ => anyhow::bail!("give only one of --cert, --identity-dir and --pkcs12"),
    }
    if a.key.is_some() && a.cert.is_none() {
        anyhow::bail!("--key goes with --cert");
    }
    if let Some(cert) = &a.cert {
        return Ok(IdentitySource::Pem {
            cert: cert.clone(),
            key: a.key.clone(),
            key_password: a.key_password_file.clone(),
        });
    }
    if let Some(dir) = &a.identity_dir {
        return Ok(IdentitySource::Dir {
            dir: dir.clone(),
            key_password: a.key_password_file.clone(),
        });
    }
    let path = a.pkcs12.clone().unwrap_or_default();
    let password = match (&a.pkcs12_password_file, std::env::var("VERO_PROXY_PKCS12_PASSWORD")) {
        (Some(f), _) => Password::File(f.clone()),
        (None, Ok(v)) => Password::Env(zeroize::Zeroizing::new(v)),
        (None, Err(_)) => anyhow::bail!(
            "--pkcs12 {} needs its password: --pkcs12-password-file PATH or VERO_PROXY_PKCS12_PASSWORD",
            path.display()
        ),
    };
    Ok(IdentitySource::Pkcs12 { path, password })
}

/// Refuses an --out that is where the identity in service lives.
fn check_staging(out: &Path, src: &IdentitySource) -> anyhow::Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let Some(out_c) = canon(out) else {
        return Ok(());
    };
    let mut dirs: Vec<PathBuf> = src.watch_dirs();
    if let IdentitySource::Dir { dir, .. } = src {
        dirs.push(dir.clone());
    }
    for d in dirs {
        if canon(&d).as_deref() == Some(out_c.as_path()) {
            anyhow::bail!(
                "--out {} is the directory of the certificate in service: the renewed pair must go \
                 to a staging directory (a renewed production certificate works at Vero API only \
                 after its daily fetch; `run --next-identity-dir DIR` puts it into service safely)",
                out.display()
            );
        }
    }
    Ok(())
}

/// Runs `cert renew`.
pub async fn run(args: RenewArgs) -> anyhow::Result<()> {
    let s = &args.service;
    let svc = s.service()?;
    let customer = s.customer();
    let hint = s.resume_hint("renew");
    let issued = if let Some(rid) = &s.retrieval_id {
        s.check_resume()?;
        certsvc::resume(&svc, &customer, rid, &s.out, &hint).await?
    } else {
        let src = source(&args)?;
        let now = SystemTime::now();
        let current = match crate::identity::load(&src, &crate::upstream::tls::provider(), now) {
            Ok(i) => i,
            Err(IdentityError::Expired { path, not_after }) => anyhow::bail!(
                "{} expired {not_after}: an expired certificate cannot be renewed: request a new \
                 one with new transfer IDs (cert request)",
                path.display()
            ),
            Err(e) => return Err(e.into()),
        };
        certsvc::renewable(&current, now)?;
        check_staging(&s.out, &src)?;
        certsvc::flow::prepare_out(&s.out, s.force)?;
        eprintln!("Renewing {} through {} ...", current.info.who(), svc.url);
        certsvc::renew(&svc, &customer, &current, &s.out, now, &hint).await?
    };
    print_done(&issued, s.environment, "renew");
    println!(
        "The certificate in service is untouched. A renewed production certificate is accepted by \
         Vero API only after Vero API's daily fetch from the certificate service; until then keep \
         the current one. `vero-proxy run --next-identity-dir {}` puts the new pair into service \
         when it is safe.",
        issued
            .cert_path
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}
