//! Flags and environment -> one validated [`Config`]. Pure functions: nothing here opens a file
//! or a socket, so every rule is unit-tested.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Uri};
use http::{HeaderName, HeaderValue};

use crate::cli::{LogFormat, RunArgs, UpstreamProtocol};
use crate::identity::{IdentitySource, Password};

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The upstream every request goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// Host name or IP literal, without brackets; used for DNS and SNI.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `host[:port]` as the upstream expects it in `Host` / `:authority`.
    pub authority: Authority,
    /// Path prefix put before every forwarded path; empty or starting with `/`, never ending in one.
    pub base_path: String,
}

/// A header the proxy sets on every forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddHeader {
    /// Header name.
    pub name: HeaderName,
    /// Its value, or the file that holds it.
    pub value: HeaderSource,
}

/// Where an added header's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderSource {
    /// Given on the command line.
    Literal(HeaderValue),
    /// Read from a file (first line, trailing newline trimmed), re-read when it changes.
    File(PathBuf),
}

/// Where identities come from.
#[derive(Debug, Clone)]
pub enum IdentityConfig {
    /// One identity (`--cert`, `--identity-dir`, `--pkcs12`).
    One(IdentitySource),
    /// One per subdirectory, named by business ID (`--identities-dir`).
    Dir {
        /// The directory.
        dir: PathBuf,
        /// `VERO_PROXY_PKCS12_PASSWORD`, for PKCS#12 files without a `password` file.
        pkcs12_password: Option<Password>,
    },
}

/// `--listen-per-identity`: a socket path template with `{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerIdentityListen {
    /// The path, `{id}` standing for the business ID.
    pub template: String,
    /// Socket file mode.
    pub mode: u32,
    /// Socket group.
    pub gid: Option<u32>,
}

impl PerIdentityListen {
    /// The socket path of one organisation.
    pub fn path_for(&self, id: &crate::business_id::BusinessId) -> PathBuf {
        PathBuf::from(self.template.replace("{id}", id.as_str()))
    }
}

/// Staged activation of a next identity, and automatic renewal into it.
#[derive(Debug, Clone)]
pub struct Staging {
    /// The single identity's next identity (with --identities-dir: each organisation's `next/`).
    pub next: Option<IdentitySource>,
    /// Probe request path.
    pub probe_path: String,
    /// Latest activation, after the next certificate's notBefore.
    pub activation_delay: Duration,
    /// Latest activation, before the current certificate's notAfter.
    pub activation_margin: Duration,
    /// Probe interval while waiting.
    pub check_interval: Duration,
    /// Automatic renewal, when on.
    pub auto_renew: Option<AutoRenew>,
}

/// `--auto-renew` and its service settings.
#[derive(Debug, Clone)]
pub struct AutoRenew {
    /// Renew this many days before notAfter.
    pub days_before: u32,
    /// The certificate service's environment.
    pub environment: crate::vero_ca::Environment,
    /// Its URL, when not the environment's.
    pub service_url: Option<String>,
    /// Extra trust anchors for its server certificate.
    pub service_ca_file: Option<PathBuf>,
    /// Replacement trust anchors for its response signatures (tests).
    pub service_signer_ca: Option<PathBuf>,
    /// `--egress-proxy`: the service is reached the way the upstream is.
    pub egress_proxy: Option<String>,
    /// `--egress-proxy-credentials-file`.
    pub egress_proxy_credentials_file: Option<PathBuf>,
}

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Main listener.
    pub listen: ListenAddr,
    /// Mode of a Unix listen socket.
    pub listen_mode: u32,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Upstream target.
    pub upstream: UpstreamTarget,
    /// Client identity source(s).
    pub identity: IdentityConfig,
    /// Staged next identities and automatic renewal.
    pub staging: Staging,
    /// One Unix socket per identity: a path with `{id}`, its mode and group id.
    pub listen_per_identity: Option<PerIdentityListen>,
    /// Cap per organisation, when below the global cap.
    pub max_upstream_concurrency_per_organisation: Option<usize>,
    /// Poll interval for identity changes; zero = no polling.
    pub reload_interval: Duration,
    /// Quiet time after file events before reloading.
    pub reload_debounce: Duration,
    /// Extra trust anchors.
    pub ca_file: Option<PathBuf>,
    /// Host names (lower case, no port) that requests may carry in `Host` or `Origin`.
    pub allowed_hosts: Vec<String>,
    /// Headers set on every forwarded request.
    pub add_headers: Vec<AddHeader>,
    /// HTTP version towards the upstream.
    pub upstream_protocol: UpstreamProtocol,
    /// Concurrency cap towards the upstream (also the cap on upstream connections).
    pub max_upstream_concurrency: usize,
    /// Requests allowed to wait for a place.
    pub upstream_queue_size: usize,
    /// Longest wait for a place.
    pub upstream_queue_timeout: Duration,
    /// TCP connect + TLS handshake limit.
    pub connect_timeout: Duration,
    /// Time to response headers.
    pub response_timeout: Duration,
    /// Idle upstream connections close after this.
    pub upstream_idle_timeout: Duration,
    /// Pool replaced this often.
    pub upstream_max_connection_age: Duration,
    /// Request head deadline.
    pub client_header_timeout: Duration,
    /// Request head size limit.
    pub max_request_header_bytes: usize,
    /// Client connection limit.
    pub max_client_connections: usize,
    /// Drain deadline at shutdown.
    pub shutdown_grace: Duration,
    /// Time between failing /readyz and refusing connections at shutdown.
    pub shutdown_delay: Duration,
    /// Remote peers may use the admin listener's probe and metrics endpoints.
    pub allow_remote_admin: bool,
    /// Days left from which renewal is open (warning).
    pub renewal_warning_days: u32,
    /// Days left from which the daily log line is an error.
    pub renewal_critical_days: u32,
    /// `--egress-proxy` as given (resolved with HTTPS_PROXY/NO_PROXY by the upstream module).
    pub egress_proxy: Option<String>,
    /// Basic credentials file for the egress proxy.
    pub egress_proxy_credentials_file: Option<PathBuf>,
    /// Log format.
    pub log_format: LogFormat,
    /// Settings that work but are probably not what the operator wants; logged at start.
    pub warnings: Vec<String>,
}

/// A flag or variable with a value that cannot be used; the message says what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl Config {
    /// Validates `run`'s flags into a config.
    pub fn from_args(args: &RunArgs) -> Result<Config, ConfigError> {
        let listen = parse_listen(&args.listen, "--listen")?;
        if let ListenAddr::Tcp(addr) = &listen {
            if !addr.ip().is_loopback() && !args.allow_remote_clients {
                return Err(bad(format!(
                    "--listen {addr} is not a loopback address: whoever reaches it acts with the \
                     organisation's certificate. Listen on 127.0.0.1 or a unix: socket, or pass \
                     --allow-remote-clients if the network in front of it is locked down."
                )));
            }
        }
        let admin_listen = match parse_listen(&args.admin_listen, "--admin-listen")? {
            ListenAddr::Tcp(a) => a,
            ListenAddr::Unix(_) => {
                return Err(bad("--admin-listen takes HOST:PORT, not a unix: path"))
            }
        };
        if !admin_listen.ip().is_loopback() && !args.allow_remote_admin {
            return Err(bad(format!(
                "--admin-listen {admin_listen} is not a loopback address; pass --allow-remote-admin to serve \
                 /healthz, /readyz and /metrics to remote peers (Kubernetes probes, Prometheus); the rest of \
                 the admin endpoints stay loopback-only"
            )));
        }
        if args.renewal_critical_days > args.renewal_warning_days {
            return Err(bad(
                "--renewal-critical-days must not be more than --renewal-warning-days",
            ));
        }
        let upstream = parse_upstream(args.upstream.as_deref().ok_or_else(|| {
            bad(
                "--upstream is required: a Vero API base URL such as https://apitest.vero.fi, \
                 or one of: test, production, sandbox (also VERO_PROXY_UPSTREAM)",
            )
        })?)?;
        let identity = match &args.identities_dir {
            Some(dir) => {
                if args.cert.is_some() || args.identity_dir.is_some() || args.pkcs12.is_some() {
                    return Err(bad(
                        "--identities-dir holds every identity; leave out --cert, --identity-dir and --pkcs12",
                    ));
                }
                IdentityConfig::Dir {
                    dir: dir.clone(),
                    pkcs12_password: args.pkcs12_password_env.clone().map(Password::Env),
                }
            }
            None => IdentityConfig::One(identity_source(args)?),
        };
        let listen_per_identity = per_identity_listen(args)?;
        let staging = staging(args, &upstream)?;
        let per_org = match args.max_upstream_concurrency_per_organisation {
            Some(0) => {
                return Err(bad(
                    "--max-upstream-concurrency-per-organisation must be at least 1",
                ))
            }
            Some(n) if n < args.max_upstream_concurrency => Some(n),
            _ => None,
        };
        let mut allowed_hosts = Vec::new();
        for h in &args.allowed_hosts {
            let h = h.trim().trim_end_matches('.').to_ascii_lowercase();
            if h.is_empty() || h.contains(['/', ' ', '@']) {
                return Err(bad(format!("--allowed-host {h:?} is not a host name")));
            }
            allowed_hosts.push(h);
        }
        let add_headers = args
            .add_headers
            .iter()
            .map(|h| parse_add_header(h))
            .collect::<Result<Vec<_>, _>>()?;
        let positive = |v: usize, flag: &str| {
            if v == 0 {
                Err(bad(format!("{flag} must be at least 1")))
            } else {
                Ok(v)
            }
        };
        Ok(Config {
            listen,
            listen_mode: parse_mode(&args.listen_mode)?,
            admin_listen,
            upstream,
            identity,
            staging,
            listen_per_identity,
            max_upstream_concurrency_per_organisation: per_org,
            reload_interval: parse_duration(&args.reload_interval, "--reload-interval")?,
            reload_debounce: parse_duration(&args.reload_debounce, "--reload-debounce")?,
            ca_file: args.ca_file.clone(),
            allowed_hosts,
            add_headers,
            upstream_protocol: args.upstream_protocol,
            max_upstream_concurrency: positive(
                args.max_upstream_concurrency,
                "--max-upstream-concurrency",
            )?,
            upstream_queue_size: args.upstream_queue_size,
            upstream_queue_timeout: parse_duration(
                &args.upstream_queue_timeout,
                "--upstream-queue-timeout",
            )?,
            connect_timeout: nonzero(
                parse_duration(&args.connect_timeout, "--connect-timeout")?,
                "--connect-timeout",
            )?,
            response_timeout: nonzero(
                parse_duration(&args.response_timeout, "--response-timeout")?,
                "--response-timeout",
            )?,
            upstream_idle_timeout: parse_duration(
                &args.upstream_idle_timeout,
                "--upstream-idle-timeout",
            )?,
            upstream_max_connection_age: parse_duration(
                &args.upstream_max_connection_age,
                "--upstream-max-connection-age",
            )?,
            client_header_timeout: parse_duration(
                &args.client_header_timeout,
                "--client-header-timeout",
            )?,
            max_request_header_bytes: args.max_request_header_bytes.max(8192),
            max_client_connections: positive(
                args.max_client_connections,
                "--max-client-connections",
            )?,
            shutdown_grace: parse_duration(&args.shutdown_grace, "--shutdown-grace")?,
            shutdown_delay: parse_duration(&args.shutdown_delay, "--shutdown-delay")?,
            allow_remote_admin: args.allow_remote_admin,
            renewal_warning_days: args.renewal_warning_days,
            renewal_critical_days: args.renewal_critical_days,
            egress_proxy: args.egress_proxy.clone(),
            egress_proxy_credentials_file: args.egress_proxy_credentials_file.clone(),
            log_format: args.log_format,
            warnings: advice(args),
        })
    }
}

fn nonzero(d: Duration, flag: &str) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(bad(format!("{flag} must be longer than zero")));
    }
    Ok(d)
}

/// Settings that are allowed but deserve a word.
fn advice(args: &RunArgs) -> Vec<String> {
    let mut out = Vec::new();
    if args.max_upstream_concurrency > 125 {
        out.push(format!(
            "--max-upstream-concurrency {} is above the 50-125 simultaneous calls the Tax Administration \
             recommends; it answers 429/403 under heavy load and may block clients it suspects of abuse",
            args.max_upstream_concurrency
        ));
    }
    let unix = args.listen.starts_with("unix:");
    if unix
        && u32::from_str_radix(args.listen_mode.trim_start_matches("0o"), 8)
            .is_ok_and(|m| m & 0o006 != 0)
    {
        out.push(format!(
            "--listen-mode {} lets every local user reach the socket and act with the organisation's certificate",
            args.listen_mode
        ));
    }
    if !unix && args.listen_mode != "0660" {
        out.push(
            "--listen-mode applies to unix: sockets only; it is ignored for a TCP listener"
                .to_string(),
        );
    }
    out
}

/// The staged-activation and auto-renewal flags.
fn staging(args: &RunArgs, upstream: &UpstreamTarget) -> Result<Staging, ConfigError> {
    let given = [
        args.next_identity_dir.is_some(),
        args.next_cert.is_some(),
        args.next_pkcs12.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(bad(
            "give only one of --next-identity-dir, --next-cert and --next-pkcs12",
        ));
    }
    if args.next_key.is_some() && args.next_cert.is_none() {
        return Err(bad("--next-key goes with --next-cert"));
    }
    if args.identities_dir.is_some() && given.iter().any(|g| *g) {
        return Err(bad(
            "with --identities-dir each organisation's next identity is its next/ subdirectory; \
             leave out --next-identity-dir, --next-cert and --next-pkcs12",
        ));
    }
    let next = if let Some(dir) = &args.next_identity_dir {
        Some(IdentitySource::Dir {
            dir: dir.clone(),
            key_password: None,
        })
    } else if let Some(cert) = &args.next_cert {
        Some(IdentitySource::Pem {
            cert: cert.clone(),
            key: args.next_key.clone(),
            key_password: None,
        })
    } else if let Some(path) = &args.next_pkcs12 {
        let file = args.next_pkcs12_password_file.clone().ok_or_else(|| {
            bad("--next-pkcs12 needs --next-pkcs12-password-file (never a password on the command line)")
        })?;
        Some(IdentitySource::Pkcs12 {
            path: path.clone(),
            password: Password::File(file),
        })
    } else {
        None
    };
    if !args.probe_path.starts_with('/') {
        return Err(bad(format!(
            "--probe-path {:?} must start with /",
            args.probe_path
        )));
    }
    let auto_renew = if args.auto_renew {
        if args.identities_dir.is_none() && args.next_identity_dir.is_none() {
            return Err(bad(
                "--auto-renew writes the renewed identity into --next-identity-dir DIR (a writable \
                 directory, such as StateDirectory= under systemd); give one",
            ));
        }
        if args.renew_days_before == 0 || args.renew_days_before > 60 {
            return Err(bad(format!(
                "--renew-days-before {} must be 1 to 60: the certificate service accepts renewals \
                 from 60 days before expiry",
                args.renew_days_before
            )));
        }
        let environment = match args.renew_environment {
            Some(e) => e,
            None => match upstream.host.as_str() {
                "api.vero.fi" => crate::vero_ca::Environment::Production,
                "apitest.vero.fi" | "api-sandbox.vero.fi" => crate::vero_ca::Environment::Test,
                other => {
                    return Err(bad(format!(
                        "--auto-renew cannot tell the certificate service's environment from --upstream \
                         {other}; give --renew-environment test or production"
                    )))
                }
            },
        };
        Some(AutoRenew {
            days_before: args.renew_days_before,
            environment,
            service_url: args.renew_service_url.clone(),
            service_ca_file: args.renew_service_ca_file.clone(),
            service_signer_ca: args.renew_service_signer_ca.clone(),
            egress_proxy: args.egress_proxy.clone(),
            egress_proxy_credentials_file: args.egress_proxy_credentials_file.clone(),
        })
    } else {
        None
    };
    Ok(Staging {
        next,
        probe_path: args.probe_path.clone(),
        activation_delay: parse_duration(&args.activation_delay, "--activation-delay")?,
        activation_margin: parse_duration(&args.activation_margin, "--activation-margin")?,
        check_interval: nonzero(
            parse_duration(
                &args.activation_check_interval,
                "--activation-check-interval",
            )?,
            "--activation-check-interval",
        )?,
        auto_renew,
    })
}

/// `--listen-per-identity` and its mode and group.
fn per_identity_listen(args: &RunArgs) -> Result<Option<PerIdentityListen>, ConfigError> {
    let Some(raw) = &args.listen_per_identity else {
        return Ok(None);
    };
    if args.identities_dir.is_none() {
        return Err(bad("--listen-per-identity goes with --identities-dir"));
    }
    let template = raw.strip_prefix("unix:").ok_or_else(|| {
        bad(format!(
            "--listen-per-identity {raw:?} must be unix:/PATH with {{id}} in it, such as unix:/run/vero-proxy/{{id}}.sock"
        ))
    })?;
    if !template.contains("{id}") || !template.starts_with('/') {
        return Err(bad(format!(
            "--listen-per-identity {raw:?} must be an absolute path with {{id}} in it (the business ID), \
             such as unix:/run/vero-proxy/{{id}}.sock"
        )));
    }
    let mode = parse_mode(&args.listen_per_identity_mode).map_err(|_| {
        bad(format!(
            "--listen-per-identity-mode {:?} is not an octal file mode such as 0660",
            args.listen_per_identity_mode
        ))
    })?;
    let gid = match &args.listen_per_identity_group {
        None => None,
        Some(g) => Some(group_id(g)?),
    };
    Ok(Some(PerIdentityListen {
        template: template.to_owned(),
        mode,
        gid,
    }))
}

/// A group's id, from its number or its name (looked up through the system's group database).
fn group_id(group: &str) -> Result<u32, ConfigError> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(bad(format!(
            "--listen-per-identity-group {group:?}: no such group; give its name or number"
        ))),
        Err(e) => Err(bad(format!(
            "--listen-per-identity-group {group:?}: the group cannot be looked up ({e}); give its number"
        ))),
    }
}

/// The flags that name one identity: `run`, `check` and `cert renew` share them.
#[derive(Default)]
pub struct IdentityFlags<'a> {
    /// `--cert`.
    pub cert: Option<&'a PathBuf>,
    /// `--key`.
    pub key: Option<&'a PathBuf>,
    /// `--identity-dir`.
    pub identity_dir: Option<&'a PathBuf>,
    /// `--pkcs12`.
    pub pkcs12: Option<&'a PathBuf>,
    /// `--pkcs12-password-file`.
    pub pkcs12_password_file: Option<&'a PathBuf>,
    /// `--key-password-file`.
    pub key_password_file: Option<&'a PathBuf>,
    /// `VERO_PROXY_PKCS12_PASSWORD`.
    pub pkcs12_password_env: Option<&'a zeroize::Zeroizing<String>>,
}

fn identity_source(args: &RunArgs) -> Result<IdentitySource, ConfigError> {
    identity_source_of(&IdentityFlags {
        cert: args.cert.as_ref(),
        key: args.key.as_ref(),
        identity_dir: args.identity_dir.as_ref(),
        pkcs12: args.pkcs12.as_ref(),
        pkcs12_password_file: args.pkcs12_password_file.as_ref(),
        key_password_file: args.key_password_file.as_ref(),
        pkcs12_password_env: args.pkcs12_password_env.as_ref(),
    })
}

/// Which of --cert, --identity-dir and --pkcs12 was given, with what goes with it.
pub fn identity_source_of(f: &IdentityFlags<'_>) -> Result<IdentitySource, ConfigError> {
    let given = [
        f.cert.is_some(),
        f.identity_dir.is_some(),
        f.pkcs12.is_some(),
    ];
    match given.iter().filter(|g| **g).count() {
        0 => {
            return Err(bad("the client certificate is required: --cert PATH (with --key PATH), \
                 --identity-dir DIR or --pkcs12 PATH (also VERO_PROXY_CERT, VERO_PROXY_IDENTITY_DIR, VERO_PROXY_PKCS12)"))
        }
        1 => {}
        _ => return Err(bad("give only one of --cert, --identity-dir and --pkcs12")),
    }
    if f.key.is_some() && f.cert.is_none() {
        return Err(bad("--key goes with --cert"));
    }
    if let Some(cert) = f.cert {
        return Ok(IdentitySource::Pem {
            cert: cert.clone(),
            key: f.key.cloned(),
            key_password: f.key_password_file.cloned(),
        });
    }
    if let Some(dir) = f.identity_dir {
        return Ok(IdentitySource::Dir {
            dir: dir.clone(),
            key_password: f.key_password_file.cloned(),
        });
    }
    let path = f.pkcs12.cloned().unwrap_or_default();
    if f.key_password_file.is_some() {
        return Err(bad("--key-password-file is for encrypted PEM keys; a PKCS#12 file takes --pkcs12-password-file"));
    }
    let password = match (f.pkcs12_password_file, f.pkcs12_password_env) {
        (Some(file), _) => Password::File(file.clone()),
        (None, Some(env)) => Password::Env(env.clone()),
        (None, None) => {
            return Err(bad(format!(
                "--pkcs12 {} needs its password: --pkcs12-password-file PATH, or the VERO_PROXY_PKCS12_PASSWORD \
                 environment variable (never on the command line, where ps would show it)",
                path.display()
            )))
        }
    };
    Ok(IdentitySource::Pkcs12 { path, password })
}

/// Parses `HOST:PORT` or `unix:/PATH`.
pub fn parse_listen(s: &str, flag: &str) -> Result<ListenAddr, ConfigError> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad(format!(
                "{flag} unix: needs a path, as in unix:/run/vero-proxy.sock"
            )));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| bad(format!("{flag} {s:?}: {port:?} is not a port number")))?;
        return Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
    }
    s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
        bad(format!(
            "{flag} {s:?} is not an address: use IP:PORT (127.0.0.1:8080, [::1]:8080) or unix:/PATH"
        ))
    })
}

fn parse_mode(s: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            bad(format!(
                "--listen-mode {s:?} is not an octal file mode such as 0660"
            ))
        })
}

/// Parses `30s`, `500ms`, `5m`, or a bare number of seconds.
pub fn parse_duration(s: &str, flag: &str) -> Result<Duration, ConfigError> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        bad(format!(
            "{flag} {s:?} is not a duration ({e}); write it as 30s, 500ms or 5m"
        ))
    })
}

/// Resolves `test` / `production` / `sandbox` or an `https://` URL into the upstream target.
pub fn parse_upstream(raw: &str) -> Result<UpstreamTarget, ConfigError> {
    // Env files often carry a stray space; the shortcuts are case-insensitive.
    let s = raw.trim();
    let url = match s.to_ascii_lowercase().as_str() {
        "test" => "https://apitest.vero.fi",
        "production" | "prod" => "https://api.vero.fi",
        "sandbox" => "https://api-sandbox.vero.fi",
        _ => s,
    };
    if !url.contains("://") && !url.contains('.') && !url.contains(':') {
        let near = ["test", "production", "sandbox"]
            .into_iter()
            .find(|w| strsim::damerau_levenshtein(w, &s.to_ascii_lowercase()) <= 2);
        let hint = near
            .map(|w| format!("did you mean {w}? "))
            .unwrap_or_default();
        return Err(bad(format!(
            "--upstream {s:?} is neither a URL nor one of test, production, sandbox; {hint}\
             (a URL looks like https://apitest.vero.fi)"
        )));
    }
    let uri: Uri = url.parse().map_err(|e| {
        bad(format!(
            "--upstream {s:?} is not a URL ({e}); write it as https://api.vero.fi"
        ))
    })?;
    match uri.scheme_str() {
        Some("https") => {}
        Some(other) => {
            return Err(bad(format!(
                "--upstream {s:?} uses {other}://; Vero API is reached over https:// only"
            )))
        }
        None => {
            return Err(bad(format!(
                "--upstream {s:?} has no scheme; write it as https://{s} or use test, production or sandbox"
            )))
        }
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| bad(format!("--upstream {s:?} has no host")))?;
    if authority.as_str().contains('@') {
        return Err(bad(format!(
            "--upstream {s:?}: credentials in the URL are not supported"
        )));
    }
    if uri.query().is_some() {
        return Err(bad(format!(
            "--upstream {s:?}: a query string is not allowed in the base URL"
        )));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if authority.port().is_none()
        && authority
            .as_str()
            .rsplit_once(']')
            .map_or(authority.as_str(), |(_, p)| p)
            .contains(':')
    {
        return Err(bad(format!(
            "--upstream {s:?}: the port must be a number from 1 to 65535"
        )));
    }
    if uri.to_string().contains('#') || raw.contains('#') {
        return Err(bad(format!(
            "--upstream {s:?}: a #fragment means nothing in the base URL; remove it"
        )));
    }
    let port = authority.port_u16().unwrap_or(443);
    if port == 0 {
        return Err(bad(format!(
            "--upstream {s:?}: the port must be a number from 1 to 65535"
        )));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(UpstreamTarget {
        host,
        port,
        authority,
        base_path,
    })
}

/// Parses `NAME: VALUE` or `NAME: @PATH`.
pub fn parse_add_header(s: &str) -> Result<AddHeader, ConfigError> {
    let (name, value) = s.split_once(':').ok_or_else(|| {
        bad("--add-header takes 'NAME: VALUE' or 'NAME: @PATH' (the value is not shown here)")
    })?;
    let name_str = name.trim();
    let name = HeaderName::from_bytes(name_str.as_bytes()).map_err(|_| {
        bad(format!(
            "--add-header: {name_str:?} is not a valid header name"
        ))
    })?;
    if crate::proxy::is_hop_by_hop(&name) || name == http::header::HOST {
        return Err(bad(format!(
            "--add-header: {name} is managed by the proxy and cannot be set"
        )));
    }
    let value = value.trim();
    if value.is_empty() {
        return Err(bad(format!("--add-header {name}: the value is empty")));
    }
    let value = match value.strip_prefix('@') {
        Some(path) if !path.is_empty() => HeaderSource::File(PathBuf::from(path)),
        Some(_) => {
            return Err(bad(format!(
                "--add-header {name}: '@' must be followed by a file path"
            )))
        }
        None => HeaderSource::Literal(HeaderValue::from_str(value).map_err(|_| {
            bad(format!(
                "--add-header {name}: the value has characters not allowed in a header"
            ))
        })?),
    };
    Ok(AddHeader { name, value })
}

/// Whether an IP is loopback (127.0.0.0/8, ::1, or IPv4-mapped loopback).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        use clap::Parser;
        let mut v = vec!["vero-proxy", "--upstream", "test", "--cert", "c.pem"];
        v.extend_from_slice(extra);
        crate::cli::Cli::try_parse_from(v).unwrap().run
    }

    #[test]
    fn shortcuts_resolve_to_vero_hosts() {
        assert_eq!(parse_upstream("test").unwrap().host, "apitest.vero.fi");
        assert_eq!(parse_upstream("production").unwrap().host, "api.vero.fi");
        assert_eq!(
            parse_upstream("sandbox").unwrap().host,
            "api-sandbox.vero.fi"
        );
    }

    #[test]
    fn base_path_and_port_are_kept() {
        let t = parse_upstream("https://example.test:8443/base/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.base_path.as_str()),
            ("example.test", 8443, "/base")
        );
        assert_eq!(t.authority.as_str(), "example.test:8443");
        let t = parse_upstream("https://[::1]:9443").unwrap();
        assert_eq!(t.host, "::1");
    }

    #[test]
    fn upstream_spellings_ports_and_fragments() {
        assert_eq!(parse_upstream(" TEST ").unwrap().host, "apitest.vero.fi");
        assert!(parse_upstream("tset")
            .unwrap_err()
            .0
            .contains("did you mean test?"));
        for bad in [
            "https://localhost:99999",
            "https://localhost:",
            "https://localhost:0",
            "https://api.vero.fi#x",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(parse_upstream("https://[::1]:8443").unwrap().port, 8443);
    }

    #[test]
    fn zero_timeouts_and_empty_header_values_are_refused() {
        assert!(Config::from_args(&args(&["--connect-timeout", "0s"]))
            .unwrap_err()
            .0
            .contains("--connect-timeout"));
        assert!(Config::from_args(&args(&["--response-timeout", "0"])).is_err());
        assert!(parse_add_header("Vero-SoftwareKey:").is_err());
        let c = Config::from_args(&args(&["--max-upstream-concurrency", "500"])).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("50-125")));
    }

    #[test]
    fn plain_http_upstream_is_refused() {
        let e = parse_upstream("http://api.vero.fi").unwrap_err();
        assert!(e.0.contains("https://"), "{e}");
        assert!(parse_upstream("api.vero.fi").is_err());
    }

    #[test]
    fn remote_listen_needs_the_flag() {
        let e = Config::from_args(&args(&["--listen", "0.0.0.0:8080"])).unwrap_err();
        assert!(e.0.contains("--allow-remote-clients"), "{e}");
        assert!(Config::from_args(&args(&[
            "--listen",
            "0.0.0.0:8080",
            "--allow-remote-clients"
        ]))
        .is_ok());
        assert!(Config::from_args(&args(&["--listen", "[::1]:8080"])).is_ok());
    }

    #[test]
    fn unix_listen_and_mode() {
        let c = Config::from_args(&args(&[
            "--listen",
            "unix:/tmp/x.sock",
            "--listen-mode",
            "0600",
        ]))
        .unwrap();
        assert_eq!(c.listen, ListenAddr::Unix("/tmp/x.sock".into()));
        assert_eq!(c.listen_mode, 0o600);
        assert!(Config::from_args(&args(&["--listen-mode", "999"])).is_err());
    }

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("30s", "x").unwrap(), Duration::from_secs(30));
        assert_eq!(
            parse_duration("250ms", "x").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("7", "x").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("soon", "--x").unwrap_err().0.contains("--x"));
    }

    #[test]
    fn add_header_forms() {
        let h = parse_add_header("Vero-SoftwareKey: abc").unwrap();
        assert_eq!(
            h.value,
            HeaderSource::Literal(HeaderValue::from_static("abc"))
        );
        let h = parse_add_header("Vero-SoftwareKey: @/run/key").unwrap();
        assert_eq!(h.value, HeaderSource::File("/run/key".into()));
        assert!(parse_add_header("novalue").is_err());
        assert!(parse_add_header("Connection: close").is_err());
        assert!(parse_add_header("Bad Name: x").is_err());
    }

    #[test]
    fn missing_upstream_and_cert_are_named() {
        use clap::Parser;
        let a = crate::cli::Cli::try_parse_from(["vero-proxy"]).unwrap().run;
        assert!(Config::from_args(&a).unwrap_err().0.contains("--upstream"));
        let a = crate::cli::Cli::try_parse_from(["vero-proxy", "--upstream", "test"])
            .unwrap()
            .run;
        assert!(Config::from_args(&a).unwrap_err().0.contains("--cert"));
    }

    #[test]
    fn exactly_one_identity_source() {
        use clap::Parser;
        let parse = |v: &[&str]| {
            let mut all = vec!["vero-proxy", "--upstream", "test"];
            all.extend_from_slice(v);
            Config::from_args(&crate::cli::Cli::try_parse_from(all).unwrap().run)
        };
        assert!(parse(&["--cert", "c", "--pkcs12", "p"])
            .unwrap_err()
            .0
            .contains("only one"));
        assert!(parse(&["--identity-dir", "d", "--key", "k"])
            .unwrap_err()
            .0
            .contains("--key goes with --cert"));
        let e = parse(&["--pkcs12", "p.p12"]).unwrap_err();
        assert!(
            e.0.contains("VERO_PROXY_PKCS12_PASSWORD") && e.0.contains("p.p12"),
            "{e}"
        );
        assert!(matches!(
            parse(&["--pkcs12", "p", "--pkcs12-password-file", "pw"])
                .unwrap()
                .identity,
            IdentityConfig::One(IdentitySource::Pkcs12 {
                password: Password::File(_),
                ..
            })
        ));
        assert!(matches!(
            parse(&["--identity-dir", "d"]).unwrap().identity,
            IdentityConfig::One(IdentitySource::Dir { .. })
        ));
    }
}
