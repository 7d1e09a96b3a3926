//! `vero-proxy check [--connect]`: validate configuration and identity without serving, and
//! print a report a person can act on. Like `nginx -t`, it exits 0 only when all is well.

use std::time::SystemTime;

use bytes::Bytes;
use http::Request;

use crate::body::RequestBody;
use crate::cli::CheckArgs;
use crate::config::{Config, IdentityConfig};
use crate::identity::{self, rfc3339, IdentitySource, RenewalState, Thresholds};
use crate::upstream::{tls, UpstreamFactory};

/// Prints one line of the report; a reader that went away (`| head`) is not an error.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Collects the report's lines and whether anything failed.
#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn ok(&self, what: &str) {
        say(&format!("ok       {what}"));
    }
    fn warn(&self, what: &str) {
        say(&format!("warning  {what}"));
    }
    fn error(&mut self, what: &str) {
        self.failed = true;
        say(&format!("error    {what}"));
    }
    fn info(&self, what: &str) {
        say(&format!("         {what}"));
    }
}

/// Which Vero environment a host is.
fn host_environment(host: &str) -> Option<&'static str> {
    match host {
        "api.vero.fi" => Some("production"),
        "apitest.vero.fi" => Some("test"),
        _ => None,
    }
}

/// Runs the check; `Ok(true)` when all is well.
pub async fn run(args: &CheckArgs) -> anyhow::Result<bool> {
    let mut r = Report::default();
    let cfg = match Config::from_args(&args.run) {
        Ok(c) => c,
        Err(e) => {
            r.error(&format!("configuration: {e}"));
            return Ok(false);
        }
    };
    r.ok(&format!(
        "configuration: upstream https://{}{}, listen {}",
        cfg.upstream.authority, cfg.upstream.base_path, cfg.listen
    ));
    for w in &cfg.warnings {
        r.warn(w);
    }
    if let Err(e) = crate::app::read_added_headers(&cfg.add_headers) {
        r.error(&format!("added headers: {e}"));
    }
    let provider = tls::provider();
    match &cfg.identity {
        IdentityConfig::One(source) => {
            check_identity(&mut r, &cfg, source, None, &provider, args).await?;
        }
        IdentityConfig::Dir {
            dir,
            pkcs12_password,
        } => {
            if let Err(e) = std::fs::read_dir(dir) {
                r.error(&format!("--identities-dir {}: {e}", dir.display()));
                return Ok(false);
            }
            let names = crate::orgs::subdirectories(dir);
            if names.is_empty() {
                r.error(&format!(
                    "--identities-dir {} holds no subdirectory; add one per business ID (1234567-1/cert.pem + key.pem)",
                    dir.display()
                ));
            }
            for name in names {
                say(&format!("\n{name}:"));
                let id = match name.parse::<crate::business_id::BusinessId>() {
                    Ok(id) => id,
                    Err(e) => {
                        r.warn(&format!("skipped: {e}"));
                        continue;
                    }
                };
                let source = crate::orgs::source_in(&dir.join(&name), pkcs12_password.as_ref());
                check_identity(&mut r, &cfg, &source, Some(id), &provider, args).await?;
            }
        }
    }
    Ok(!r.failed)
}

/// Checks one identity (and with --connect, makes a handshake and a request with it).
async fn check_identity(
    r: &mut Report,
    cfg: &Config,
    source: &IdentitySource,
    organisation: Option<crate::business_id::BusinessId>,
    provider: &std::sync::Arc<rustls::crypto::CryptoProvider>,
    args: &CheckArgs,
) -> anyhow::Result<()> {
    let ident = match identity::load(source, provider, SystemTime::now()) {
        Ok(i) => i,
        Err(e) => {
            r.error(&format!("identity: {e}"));
            return Ok(());
        }
    };
    if let Err(e) = crate::reload::check_organisation(organisation, &ident) {
        r.error(&e);
        return Ok(());
    }
    let info = &ident.info;
    let now = SystemTime::now();
    r.ok(&format!(
        "identity from {}: the key matches the certificate",
        ident.source
    ));
    r.info(&format!("subject  {}", info.subject));
    r.info(&format!("issuer   {}", info.issuer));
    r.info(&format!("serial   {}", info.serial));
    r.info(&format!(
        "valid    {} to {} ({} left)",
        rfc3339(info.not_before),
        rfc3339(info.not_after),
        identity::days_text(info.days_left(now))
    ));
    r.info(&format!("sha256   {}", info.fingerprint_sha256));
    r.info(&format!(
        "chain    {} certificate(s) sent after the leaf",
        info.chain_len
    ));
    let t = Thresholds {
        warning_days: cfg.renewal_warning_days,
        critical_days: cfg.renewal_critical_days,
    };
    match info.renewal_state(now, t) {
        RenewalState::Ok => {}
        RenewalState::RenewalOpen => r.warn(&format!(
            "the renewal window is open: {} left; renew through the certificate service now",
            identity::days_text(info.days_left(now))
        )),
        RenewalState::Critical => r.warn(&format!(
            "only {} left: renew now",
            identity::days_text(info.days_left(now))
        )),
        RenewalState::Expired => r.error("the certificate has expired"),
    }
    if let (Some(cert_env), Some(host_env)) = (
        ident
            .certified_key
            .cert
            .first()
            .and_then(|leaf| crate::vero_ca::environment_of(leaf.as_ref()))
            .or_else(|| crate::vero_ca::by_issuer_name(&info.issuer).map(|(e, _)| e))
            .map(|e| e.as_str()),
        host_environment(&cfg.upstream.host),
    ) {
        if cert_env != host_env {
            r.warn(&format!(
                "a {cert_env} certificate is pointed at the {host_env} API ({}): the handshake will be refused",
                cfg.upstream.host
            ));
        }
    }
    if info.client_auth_allowed == Some(false) {
        r.warn("the certificate's extended key usage does not allow TLS client authentication");
    }
    for w in &ident.warnings {
        r.warn(w);
    }
    if args.connect {
        connect(
            r,
            cfg.clone(),
            ident,
            provider.clone(),
            &args.run.probe_path,
        )
        .await?;
    }
    Ok(())
}

/// A real handshake and one request, each reported.
async fn connect(
    r: &mut Report,
    cfg: Config,
    ident: identity::Identity,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
    probe_path: &str,
) -> anyhow::Result<()> {
    let roots = tls::trust_anchors(cfg.ca_file.as_deref())?;
    let headers = crate::app::read_added_headers(&cfg.add_headers).unwrap_or_default();
    let authority = cfg.upstream.authority.clone();
    let target = format!("{}{}", cfg.upstream.base_path, probe_path);
    let factory = UpstreamFactory::new(std::sync::Arc::new(cfg), roots, provider);
    let upstream = factory.build(std::sync::Arc::new(ident))?;
    let who = upstream.identity.info.who();
    let conn = match upstream.pool.checkout().await {
        Ok(c) => c,
        Err(e) => {
            r.error(&format!("TLS handshake with {authority}: {e}"));
            return Ok(());
        }
    };
    r.ok(&format!(
        "TLS handshake with {authority} ({})",
        if conn.is_h2() { "HTTP/2" } else { "HTTP/1.1" }
    ));
    let mut req = Request::get(target.as_str()).body(RequestBody::Full(Some(Bytes::new())))?;
    for (name, value) in headers {
        req.headers_mut().insert(name, value);
    }
    let resp = match conn.send(req, &authority).await {
        Ok((resp, _)) => resp,
        Err(e) => {
            let msg = match e
                .tls
                .as_ref()
                .or_else(|| crate::error::find_tls_error(&e.error))
            {
                                Some(tls_err) => tls::answer_for(tls_err, authority.as_ref(), &who).to_string(),
                // The handshake had just passed and the first request got no answer at all:
                // under TLS 1.3 a refused certificate can arrive exactly so, when the alert is
                // lost behind the connection's reset.
                _ => format!(
                    "the upstream closed the connection right after the TLS handshake without answering ({}): \
                     it most likely refused our client certificate (wrong environment's certificate? expired? \
                     not yet known to Vero API?)",
                    e.error
                ),
            };
            r.error(&format!("request to {target}: {msg}"));
            return Ok(());
        }
    };
    let status = resp.status().as_u16();
    let body =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(resp.into_body(), 4096))
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
    match status {
        401 => {
            r.error(&format!(
                "GET {target}: 401 from the API: the handshake passed but the call was refused"
            ));
            r.info(&format!("the API said: {body}"));
            r.info("likely: the software key is missing or wrong (--add-header 'Vero-SoftwareKey: @FILE')");
        }
        403 => {
            r.error(&format!(
                "GET {target}: 403 from the API: the handshake passed but the call was refused"
            ));
            r.info(&format!("the API said: {body}"));
            r.info("likely: no production access yet (pass the integration verification first), or a renewed \
                    production certificate that Vero API has not fetched yet (it does so once a day)");
        }
        s @ (400 | 495 | 496) if s != 400 || body.to_ascii_lowercase().contains("certificate") => {
            r.error(&format!(
                "GET {target}: {s} from the upstream: it refused the client certificate after the handshake"
            ));
            r.info(&format!("the upstream said: {body}"));
            r.info("likely: a certificate from the wrong environment or CA, or one the server does not know yet");
        }
        s if s >= 500 => {
            r.warn(&format!(
                "GET {target}: {s} from the upstream: the handshake passed, but this answer does not show whether the certificate is accepted"
            ));
        }
        s => r.ok(&format!(
            "GET {target}: {s} from the API: the certificate was accepted"
        )),
    }
    Ok(())
}
