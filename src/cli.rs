//! Command-line definitions. Every flag of `run` can also come from an environment variable
//! named `VERO_PROXY_<FLAG>`, which is how container and systemd deployments configure it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The whole command line.
#[derive(Debug, Parser)]
#[command(
    name = "vero-proxy",
    version,
    about = "Plain HTTP on localhost in, mutual TLS to Vero API out.",
    long_about = "Legacy applications send plain HTTP to vero-proxy on localhost; it re-sends every \
                  request to the Finnish Tax Administration's Vero API over mutual TLS, presenting the \
                  organisation's client certificate.\n\nWith no subcommand, `run` is assumed.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; `run` when left out.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Flags of `run`, accepted without the subcommand name too.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Forward plain HTTP from local applications to Vero API over mutual TLS (the default).
    Run(Box<RunArgs>),
    /// Show the proxy working against a local stand-in upstream with a throwaway test PKI.
    Demo(DemoArgs),
    /// Check the configuration and identity without serving (like `nginx -t`); with --connect,
    /// also make a real handshake and one request to the upstream. Exit 0 when all is well.
    Check(Box<CheckArgs>),
    /// The certificate lifecycle: inspect a certificate, get the first one with transfer IDs,
    /// renew it through the Tax Administration's certificate service.
    Cert(crate::cert::CertArgs),
}

/// Flags of `vero-proxy check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Also make a real TLS handshake and one request (GET --probe-path, with the configured
    /// added headers) to the upstream.
    #[arg(long)]
    pub connect: bool,

    /// The settings to check: the same flags as `run`.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Flags of `vero-proxy run`.
#[derive(Debug, Clone, Args, Default)]
pub struct RunArgs {
    /// A TOML file holding any of these settings, keys spelled like the long flags
    /// (`max-upstream-concurrency = 50`); flags and environment variables override it.
    #[arg(long, env = "VERO_PROXY_CONFIG")]
    pub config: Option<PathBuf>,

    /// Where applications connect: HOST:PORT, or unix:/PATH for a Unix socket.
    #[arg(long, env = "VERO_PROXY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Permissions of a unix: listen socket, in octal.
    #[arg(long, env = "VERO_PROXY_LISTEN_MODE", default_value = "0660")]
    pub listen_mode: String,

    /// Allow the main listener on a non-loopback address: whoever reaches it acts with the
    /// organisation's certificate.
    #[arg(long, env = "VERO_PROXY_ALLOW_REMOTE_CLIENTS", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_remote_clients: bool,

    /// Vero API base URL, or one of: test, production, sandbox.
    #[arg(long, env = "VERO_PROXY_UPSTREAM")]
    pub upstream: Option<String>,

    /// Client certificate (PEM; the chain may follow the leaf; may also hold the key).
    /// One of --cert, --identity-dir or --pkcs12 is required.
    #[arg(long, env = "VERO_PROXY_CERT")]
    pub cert: Option<PathBuf>,

    /// Private key of the client certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "VERO_PROXY_KEY")]
    pub key: Option<PathBuf>,

    /// A directory holding cert.pem + key.pem, or tls.crt + tls.key (a Kubernetes TLS Secret).
    #[arg(long, env = "VERO_PROXY_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,

    /// A PKCS#12 / PFX file with the certificate and key (password from --pkcs12-password-file
    /// or the VERO_PROXY_PKCS12_PASSWORD env var; never on the command line).
    #[arg(long, env = "VERO_PROXY_PKCS12")]
    pub pkcs12: Option<PathBuf>,

    /// Many organisations: every subdirectory, named by business ID (1234567-1/), holds one
    /// organisation's identity (cert.pem + key.pem, tls.crt + tls.key, or a *.p12 with a
    /// `password` file). Requests choose one with the header Vero-Proxy-Organisation.
    #[arg(long, env = "VERO_PROXY_IDENTITIES_DIR")]
    pub identities_dir: Option<PathBuf>,

    /// With --identities-dir: also one Unix socket per identity, whose requests always use that
    /// identity (the header is ignored), e.g. unix:/run/vero-proxy/{id}.sock.
    #[arg(long, env = "VERO_PROXY_LISTEN_PER_IDENTITY")]
    pub listen_per_identity: Option<String>,

    /// Permissions of the per-identity sockets, in octal.
    #[arg(
        long,
        env = "VERO_PROXY_LISTEN_PER_IDENTITY_MODE",
        default_value = "0660"
    )]
    pub listen_per_identity_mode: String,

    /// Group (name or number) of the per-identity sockets, so each organisation's apps can be
    /// given only their own socket.
    #[arg(long, env = "VERO_PROXY_LISTEN_PER_IDENTITY_GROUP")]
    pub listen_per_identity_group: Option<String>,

    /// File whose first line is the PKCS#12 password; read again at every reload.
    #[arg(long, env = "VERO_PROXY_PKCS12_PASSWORD_FILE")]
    pub pkcs12_password_file: Option<PathBuf>,

    /// File whose first line is the password of an encrypted PKCS#8 key.
    #[arg(long, env = "VERO_PROXY_KEY_PASSWORD_FILE")]
    pub key_password_file: Option<PathBuf>,

    /// The PKCS#12 password from VERO_PROXY_PKCS12_PASSWORD (read by main, never a flag).
    #[arg(skip)]
    pub pkcs12_password_env: Option<zeroize::Zeroizing<String>>,

    /// How often the identity files are compared with the identity in service (a safety net for
    /// mounts where file events never arrive); 0 turns polling off.
    #[arg(long, env = "VERO_PROXY_RELOAD_INTERVAL", default_value = "30s")]
    pub reload_interval: String,

    /// Quiet time after the last file event before the files are read again.
    #[arg(long, env = "VERO_PROXY_RELOAD_DEBOUNCE", default_value = "50ms")]
    pub reload_debounce: String,

    /// Extra trust anchors (PEM) for the upstream's server certificate, added to the system's.
    #[arg(long, env = "VERO_PROXY_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Admin listener for /healthz and /readyz.
    #[arg(
        long,
        env = "VERO_PROXY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9901"
    )]
    pub admin_listen: String,

    /// Allow a non-loopback --admin-listen: remote peers get /healthz, /readyz and /metrics only
    /// (Kubernetes probes, Prometheus); /status, /reload and / answer loopback peers only.
    #[arg(long, env = "VERO_PROXY_ALLOW_REMOTE_ADMIN", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_remote_admin: bool,

    /// Days before expiry from which the certificate can be renewed (Vero: 60); from then a
    /// warning is logged at load and daily.
    #[arg(long, env = "VERO_PROXY_RENEWAL_WARNING_DAYS", default_value_t = 60)]
    pub renewal_warning_days: u32,

    /// Days before expiry from which the daily log line is an error.
    #[arg(long, env = "VERO_PROXY_RENEWAL_CRITICAL_DAYS", default_value_t = 14)]
    pub renewal_critical_days: u32,

    /// The next identity, staged: a directory with cert.pem + key.pem (or tls.crt + tls.key),
    /// such as `cert renew --out` writes. Watched like the current one and put into service by
    /// the running proxy once it is safe (see --probe-path, --activation-delay). With
    /// --identities-dir, each organisation's next identity is its `next/` subdirectory.
    #[arg(long, env = "VERO_PROXY_NEXT_IDENTITY_DIR")]
    pub next_identity_dir: Option<PathBuf>,

    /// The next identity's certificate (PEM), instead of --next-identity-dir.
    #[arg(long, env = "VERO_PROXY_NEXT_CERT")]
    pub next_cert: Option<PathBuf>,

    /// The next identity's key (PEM), with --next-cert.
    #[arg(long, env = "VERO_PROXY_NEXT_KEY")]
    pub next_key: Option<PathBuf>,

    /// The next identity as PKCS#12, its password from --next-pkcs12-password-file.
    #[arg(long, env = "VERO_PROXY_NEXT_PKCS12")]
    pub next_pkcs12: Option<PathBuf>,

    /// File whose first line is the next PKCS#12's password.
    #[arg(long, env = "VERO_PROXY_NEXT_PKCS12_PASSWORD_FILE")]
    pub next_pkcs12_password_file: Option<PathBuf>,

    /// Path a staged identity is tried on (GET, with the added headers): a completed handshake
    /// and a status other than 401/403 mean Vero API accepts it, and it goes into service.
    #[arg(long, env = "VERO_PROXY_PROBE_PATH", default_value = "/")]
    pub probe_path: String,

    /// A staged identity goes into service at the latest this long after its notBefore (Vero
    /// API fetches renewed production certificates once a day).
    #[arg(long, env = "VERO_PROXY_ACTIVATION_DELAY", default_value = "24h")]
    pub activation_delay: String,

    /// ... and in any case this long before the current certificate expires.
    #[arg(long, env = "VERO_PROXY_ACTIVATION_MARGIN", default_value = "7d")]
    pub activation_margin: String,

    /// How often a staged identity is probed while it waits.
    #[arg(
        long,
        env = "VERO_PROXY_ACTIVATION_CHECK_INTERVAL",
        default_value = "15m"
    )]
    pub activation_check_interval: String,

    /// Renew the certificate automatically through the Tax Administration's certificate service
    /// when the renewal window opens, into the next identity's directory (which must be
    /// writable), from where it is activated as above.
    #[arg(long, env = "VERO_PROXY_AUTO_RENEW", value_parser = clap::builder::BoolishValueParser::new())]
    pub auto_renew: bool,

    /// With --auto-renew: days before expiry to renew (the service accepts 60 at most).
    #[arg(long, env = "VERO_PROXY_RENEW_DAYS_BEFORE", default_value_t = 50)]
    pub renew_days_before: u32,

    /// With --auto-renew: the certificate service's environment (test or production); by
    /// default the one --upstream points at.
    #[arg(long, env = "VERO_PROXY_RENEW_ENVIRONMENT")]
    pub renew_environment: Option<crate::vero_ca::Environment>,

    /// With --auto-renew: the certificate service's URL, instead of the environment's.
    #[arg(long, env = "VERO_PROXY_RENEW_SERVICE_URL")]
    pub renew_service_url: Option<String>,

    /// With --auto-renew: extra trust anchors (PEM) for the certificate service's server.
    #[arg(long, env = "VERO_PROXY_RENEW_SERVICE_CA_FILE")]
    pub renew_service_ca_file: Option<PathBuf>,

    /// With --auto-renew: trust anchors (PEM) for the service's response signatures instead of
    /// the embedded Tax Administration chains (for tests against a stand-in only).
    #[arg(long, env = "VERO_PROXY_RENEW_SERVICE_SIGNER_CA")]
    pub renew_service_signer_ca: Option<PathBuf>,

    /// Tunnel upstream connections through this HTTP proxy with CONNECT (http://HOST:PORT);
    /// else HTTPS_PROXY / NO_PROXY when set.
    #[arg(long, env = "VERO_PROXY_EGRESS_PROXY")]
    pub egress_proxy: Option<String>,

    /// File holding `user:password` for the egress proxy (basic authentication).
    #[arg(long, env = "VERO_PROXY_EGRESS_PROXY_CREDENTIALS_FILE")]
    pub egress_proxy_credentials_file: Option<PathBuf>,

    /// Host names, besides localhost and the loopback addresses, that requests may name in Host.
    #[arg(
        long = "allowed-host",
        env = "VERO_PROXY_ALLOWED_HOST",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,

    /// 'NAME: VALUE' or 'NAME: @PATH' (value read from the file): set on every forwarded request.
    /// Repeatable; in VERO_PROXY_ADD_HEADER, one header per line.
    #[arg(
        long = "add-header",
        env = "VERO_PROXY_ADD_HEADER",
        value_delimiter = '\n'
    )]
    pub add_headers: Vec<String>,

    /// HTTP version towards the upstream.
    #[arg(long, env = "VERO_PROXY_UPSTREAM_PROTOCOL", value_enum, ignore_case = true, default_value_t = UpstreamProtocol::Auto)]
    pub upstream_protocol: UpstreamProtocol,

    /// Most requests in flight to the upstream at once (Vero recommends at most 50-125).
    #[arg(
        long,
        env = "VERO_PROXY_MAX_UPSTREAM_CONCURRENCY",
        default_value_t = 50
    )]
    pub max_upstream_concurrency: usize,

    /// Most requests in flight upstream for one organisation (with --identities-dir), so one busy
    /// client company cannot starve the rest; defaults to --max-upstream-concurrency.
    #[arg(long, env = "VERO_PROXY_MAX_UPSTREAM_CONCURRENCY_PER_ORGANISATION")]
    pub max_upstream_concurrency_per_organisation: Option<usize>,

    /// Most requests waiting for a place under the concurrency cap.
    #[arg(long, env = "VERO_PROXY_UPSTREAM_QUEUE_SIZE", default_value_t = 1000)]
    pub upstream_queue_size: usize,

    /// How long a request may wait for a place before it gets 503 upstream_busy.
    #[arg(long, env = "VERO_PROXY_UPSTREAM_QUEUE_TIMEOUT", default_value = "30s")]
    pub upstream_queue_timeout: String,

    /// Time allowed for the TCP connect and TLS handshake to the upstream.
    #[arg(long, env = "VERO_PROXY_CONNECT_TIMEOUT", default_value = "10s")]
    pub connect_timeout: String,

    /// Time allowed for the upstream's response headers.
    #[arg(long, env = "VERO_PROXY_RESPONSE_TIMEOUT", default_value = "60s")]
    pub response_timeout: String,

    /// Idle upstream connections are closed after this long.
    #[arg(long, env = "VERO_PROXY_UPSTREAM_IDLE_TIMEOUT", default_value = "60s")]
    pub upstream_idle_timeout: String,

    /// The upstream pool is replaced by a fresh one this often, so DNS changes are seen.
    #[arg(
        long,
        env = "VERO_PROXY_UPSTREAM_MAX_CONNECTION_AGE",
        default_value = "5m"
    )]
    pub upstream_max_connection_age: String,

    /// Request headers must arrive within this time.
    #[arg(long, env = "VERO_PROXY_CLIENT_HEADER_TIMEOUT", default_value = "30s")]
    pub client_header_timeout: String,

    /// Largest request head accepted from applications, in bytes.
    #[arg(
        long,
        env = "VERO_PROXY_MAX_REQUEST_HEADER_BYTES",
        default_value_t = 65536
    )]
    pub max_request_header_bytes: usize,

    /// Most application connections served at once; more wait in the listen backlog.
    #[arg(
        long,
        env = "VERO_PROXY_MAX_CLIENT_CONNECTIONS",
        default_value_t = 4096
    )]
    pub max_client_connections: usize,

    /// On SIGTERM or SIGINT, how long requests in flight may take to finish.
    #[arg(long, env = "VERO_PROXY_SHUTDOWN_GRACE", default_value = "30s")]
    pub shutdown_grace: String,

    /// On SIGTERM, /readyz fails at once but the listener keeps accepting this long, so load
    /// balancers stop sending before connections are refused.
    #[arg(long, env = "VERO_PROXY_SHUTDOWN_DELAY", default_value = "0s")]
    pub shutdown_delay: String,

    /// Log level or filter (error, warn, info, debug, or a tracing filter such as
    /// `info,vero_proxy=debug`); else VERO_PROXY_LOG, else RUST_LOG, else info.
    #[arg(long, env = "VERO_PROXY_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Log format.
    #[arg(long, env = "VERO_PROXY_LOG_FORMAT", value_enum, ignore_case = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Flags of `vero-proxy demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Where the demo proxy listens; a free port is picked when this one is taken.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Where the demo's admin listener listens; a free port is picked when this one is taken.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_listen: String,
}

/// HTTP version spoken to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum UpstreamProtocol {
    /// Offer h2 and http/1.1 in ALPN and use what the server picks.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only.
    Http2,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}
