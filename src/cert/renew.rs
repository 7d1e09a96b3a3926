//! `vero-proxy cert renew`: a new certificate for a new key, the request signed with the
//! certificate in service, written to a staging directory (never over the identity in service).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Args;

use super::request::{print_done, ServiceArgs};
use crate::business_id::BusinessId;
use crate::certsvc;
use crate::config::IdentityFlags;
use crate::identity::{rfc3339, unix, Identity, IdentityError, IdentitySource, Password};

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

    /// Many organisations (as for `run`): the directory whose subdirectory --organisation holds
    /// the current identity; --out defaults to that subdirectory's next/, where `run` looks for
    /// its staged identity.
    #[arg(long, env = "VERO_PROXY_IDENTITIES_DIR")]
    pub identities_dir: Option<PathBuf>,

    /// With --identities-dir: whose certificate to renew (business ID).
    #[arg(long)]
    pub organisation: Option<BusinessId>,

    /// Exit 0 without contacting the service when nothing is due: the renewal window (60 days
    /// before expiry) is not open yet, or a renewed pair is already staged in --out. For a daily
    /// job. An expired certificate still fails; leftovers of an unfinished attempt in --out are
    /// replaced.
    #[arg(long)]
    pub if_due: bool,
}

/// The current identity's source, with the same rules `run` applies; with --identities-dir,
/// the organisation's directory (and --out, --customer-id defaulting from it).
fn source(a: &RenewArgs, s: &mut ServiceArgs) -> anyhow::Result<IdentitySource> {
    let env_password = std::env::var("VERO_PROXY_PKCS12_PASSWORD")
        .ok()
        .map(zeroize::Zeroizing::new);
    if let Some(root) = &a.identities_dir {
        if a.cert.is_some() || a.identity_dir.is_some() || a.pkcs12.is_some() {
            anyhow::bail!("--identities-dir names the identity with --organisation; leave out --cert, --identity-dir and --pkcs12");
        }
        let org = a.organisation.ok_or_else(|| {
            anyhow::anyhow!("--identities-dir needs --organisation ID: whose certificate to renew")
        })?;
        let dir = root.join(org.as_str());
        if !dir.is_dir() {
            anyhow::bail!(
                "{} does not exist: no identity of {org} in --identities-dir",
                dir.display()
            );
        }
        s.out.get_or_insert_with(|| dir.join("next"));
        s.customer_id.get_or_insert_with(|| org.to_string());
        return Ok(crate::orgs::source_in(
            &dir,
            env_password.map(Password::Env).as_ref(),
        ));
    }
    if a.organisation.is_some() {
        anyhow::bail!("--organisation goes with --identities-dir");
    }
    Ok(crate::config::identity_source_of(&IdentityFlags {
        cert: a.cert.as_ref(),
        key: a.key.as_ref(),
        identity_dir: a.identity_dir.as_ref(),
        pkcs12: a.pkcs12.as_ref(),
        pkcs12_password_file: a.pkcs12_password_file.as_ref(),
        key_password_file: a.key_password_file.as_ref(),
        pkcs12_password_env: env_password.as_ref(),
    })?)
}

/// With --if-due: Some(reason) when there is nothing to do today.
fn not_due(current: &Identity, out: &Path, now: SystemTime) -> Option<String> {
    // A renewed pair already staged in --out (a later notAfter, loading cleanly).
    let staged = IdentitySource::Dir {
        dir: out.to_path_buf(),
        key_password: None,
    };
    if let Ok(next) = crate::identity::load(&staged, &crate::upstream::tls::provider(), now) {
        if next.info.not_after > current.info.not_after {
            return Some(format!(
                "a renewed certificate is already staged in {} (valid until {}); nothing to do",
                out.display(),
                rfc3339(next.info.not_after)
            ));
        }
    }
    let opens = certsvc::flow::renewal_opens(&current.info);
    (unix(now) < opens).then(|| {
        format!(
            "{} is valid until {}; renewal is due from {} (--if-due: nothing to do yet)",
            current.info.who(),
            rfc3339(current.info.not_after),
            rfc3339(opens)
        )
    })
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
    let mut s = args.service.clone();
    let src =
        if s.retrieval_id.is_some() && s.customer_id.is_some() && args.identities_dir.is_none() {
            None
        } else {
            Some(source(&args, &mut s)?)
        };
    let s = &s;
    let out = s.out()?.to_path_buf();
    let svc = s.service()?;
    let issued = if let Some(rid) = &s.retrieval_id {
        s.check_resume()?;
        let customer = s.customer()?;
        certsvc::resume(&svc, &customer, rid, &out, &s.resume_hint("renew")).await?
    } else {
        let src = src.ok_or_else(|| anyhow::anyhow!("the current identity is required"))?;
        let now = SystemTime::now();
        let current = match crate::identity::load(&src, &crate::upstream::tls::provider(), now) {
            Ok(i) => i,
            Err(IdentityError::Expired { path, not_after }) => anyhow::bail!(
                "{} expired {not_after}: {}",
                path.display(),
                certsvc::flow::EXPIRED_CANNOT_RENEW
            ),
            Err(e) => return Err(e.into()),
        };
        if args.if_due {
            if let Some(why) = not_due(&current, &out, now) {
                println!("{why}");
                return Ok(());
            }
        }
        certsvc::renewable(&current, now)?;
        check_staging(&out, &src)?;
        let customer = match &s.customer_id {
            Some(_) => s.customer()?,
            None => certsvc::customer_of(s.environment, &current, s.customer_name.clone())?,
        };
        let mut s = s.clone();
        s.customer_id = Some(customer.customer_id.clone());
        // --if-due has found nothing newer staged in --out: what is there is a leftover of an
        // attempt that did not finish (a renewal can simply be asked for again), so a daily job
        // is never stuck on it.
        certsvc::flow::prepare_out(&out, s.force || args.if_due)?;
        eprintln!("Renewing {} through {} ...", current.info.who(), svc.url);
        certsvc::renew(
            &svc,
            &customer,
            &current,
            &out,
            now,
            &s.resume_hint("renew"),
        )
        .await?
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
