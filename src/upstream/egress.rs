//! Egress through a corporate HTTP proxy: which proxy (if any) upstream connections go through,
//! decided once at start, and the `CONNECT` tunnel the mTLS handshake then runs inside, end to
//! end, so the proxy sees neither our certificate's key nor a byte of the requests.
//!
//! `--egress-proxy` wins; else `HTTPS_PROXY` (or `https_proxy`) when set, unless `NO_PROXY` (or
//! `no_proxy`) names the upstream host. Deciding is a pure function of those values: the caller
//! reads the environment.

use std::net::IpAddr;
use std::path::Path;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::error::ProxyError;

/// The longest proxy answer head read before giving up on it.
const MAX_HEAD: usize = 8 * 1024;

/// An egress setting that cannot be used; the message names the flag or variable to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EgressError(pub String);

/// The conventional proxy variables as the caller read them: `(name, value)` of the first one set
/// and not empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    /// `HTTPS_PROXY`, else `https_proxy`.
    pub https_proxy: Option<(&'static str, String)>,
    /// `NO_PROXY`, else `no_proxy`.
    pub no_proxy: Option<String>,
}

impl ProxyEnv {
    /// This process's environment.
    pub fn from_process() -> ProxyEnv {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Picks the variables through `lookup` (tests pass their own; `from_process` reads the
    /// environment); an empty value counts as unset, as curl and Go treat it.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> ProxyEnv {
        let first = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|n| lookup(n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
        };
        ProxyEnv {
            https_proxy: first(["HTTPS_PROXY", "https_proxy"]),
            no_proxy: first(["NO_PROXY", "no_proxy"]).map(|(_, v)| v),
        }
    }
}

/// A proxy address taken from a URL, before any credentials file is read.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyAddr {
    /// Host name or IP literal, without brackets.
    pub host: String,
    /// TCP port (80 when the URL names none).
    pub port: u16,
    /// The flag or variable it came from, for messages.
    pub source: &'static str,
    /// `user:password` from the URL itself (allowed in the environment variable only).
    url_credentials: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for ProxyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyAddr")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("source", &self.source)
            .field(
                "url_credentials",
                &self.url_credentials.as_ref().map(|_| "…"),
            )
            .finish()
    }
}

/// How upstream connections leave this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Straight to the upstream; the reason, for the start-up log line.
    Direct(String),
    /// Through this proxy.
    Proxy(ProxyAddr),
}

/// Decides the route from `--egress-proxy` (`flag`) and the environment, for the upstream `host`
/// and `port`. The flag is an explicit choice and wins whole: `NO_PROXY` applies only to
/// `HTTPS_PROXY`, which is never used for a loopback upstream (a remote proxy cannot reach it).
pub fn resolve(
    flag: Option<&str>,
    env: &ProxyEnv,
    host: &str,
    port: u16,
) -> Result<Route, EgressError> {
    if let Some(raw) = flag.filter(|f| !f.trim().is_empty()) {
        let addr = parse_proxy_url(raw, "--egress-proxy")?;
        if addr.url_credentials.is_some() {
            return Err(EgressError(
                "--egress-proxy must not carry credentials (they would show in the process list): \
                 put user:password in a file and pass it with --egress-proxy-credentials-file"
                    .into(),
            ));
        }
        return Ok(Route::Proxy(addr));
    }
    let Some((name, raw)) = &env.https_proxy else {
        return Ok(Route::Direct("no --egress-proxy and no HTTPS_PROXY".into()));
    };
    if is_loopback(host) {
        return Ok(Route::Direct(format!(
            "the upstream {host} is on this machine; {name} is not used for it"
        )));
    }
    if let Some(no_proxy) = &env.no_proxy {
        if no_proxy_matches(no_proxy, host, port) {
            return Ok(Route::Direct(format!(
                "NO_PROXY excludes {host} from {name}"
            )));
        }
    }
    parse_proxy_url(raw, name).map(Route::Proxy)
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h == "localhost"
        || h.ends_with(".localhost")
        || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a `NO_PROXY` list names `host` (port `port`). Entries are separated by commas; `*`
/// matches every host; an entry matches that host and every host under it (a leading `.` or
/// `*.` changes nothing, as in curl); an entry with `:port` matches only that port.
pub fn no_proxy_matches(no_proxy: &str, host: &str, port: u16) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    no_proxy.split(',').any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        if entry == "*" {
            return true;
        }
        let (name, entry_port) = split_entry_port(&entry);
        if entry_port.is_some_and(|p| p != port) {
            return false;
        }
        let name = name.trim_start_matches("*.").trim_start_matches('.');
        let name = name.trim_end_matches('.');
        !name.is_empty()
            && (host == name
                || host
                    .strip_suffix(name)
                    .is_some_and(|rest| rest.ends_with('.')))
    })
}

/// `name[:port]`, `[v6]:port` or a bare IPv6 literal -> the name without brackets, and the port.
fn split_entry_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((ip, after)) = rest.split_once(']') {
            return (ip, after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match entry.rsplit_once(':') {
        Some((name, p)) if !name.contains(':') => match p.parse() {
            Ok(port) => (name, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

/// Parses `http://[user:password@]host[:port][/]`; a URL without a scheme is taken as http, as
/// curl and Go take it. Error messages never repeat credentials.
fn parse_proxy_url(raw: &str, source: &'static str) -> Result<ProxyAddr, EgressError> {
    let raw = raw.trim();
    let rest = match raw.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(EgressError(format!(
                "{source}: only http:// proxies are supported, not {scheme}:// (the mTLS to Vero \
                 API is end to end inside the CONNECT tunnel either way); write it as http://HOST:PORT"
            )))
        }
        None => raw,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let shown = format!("http://{hostport}");
    if hostport.contains(['/', '?', '#']) {
        return Err(EgressError(format!(
            "{source} {shown}: a proxy URL is http://HOST:PORT, without a path"
        )));
    }
    let authority: http::uri::Authority = hostport.parse().map_err(|_| {
        EgressError(format!(
            "{source} {shown} is not a proxy address; write it as http://HOST:PORT"
        ))
    })?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(EgressError(format!("{source} {shown} names no host")));
    }
    // `Authority::port` gives None for an unparsable port too: look at the text after the host.
    let port_text = authority
        .as_str()
        .get(authority.host().len()..)
        .unwrap_or("")
        .trim_start_matches(':');
    let port = match port_text.parse::<u16>() {
        _ if port_text.is_empty() => 80,
        Ok(0) | Err(_) => {
            return Err(EgressError(format!(
                "{source} {shown}: {port_text:?} is not a port number (1-65535)"
            )))
        }
        Ok(p) => p,
    };
    let url_credentials = match userinfo {
        None => None,
        Some(u) => Some(percent_decode(u).ok_or_else(|| {
            EgressError(format!(
                "{source}: the credentials in the proxy URL for {shown} are not valid percent-encoded UTF-8"
            ))
        })?),
    };
    Ok(ProxyAddr {
        host: host.to_owned(),
        port,
        source,
        url_credentials,
    })
}

/// Decodes `%XX` escapes (RFC 3986 userinfo); `None` for a broken escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<Zeroizing<String>> {
    let bytes = s.as_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len()));
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out.to_vec()).ok().map(Zeroizing::new)
}

/// Reads `user:password` from the first line of `path` (trailing newline trimmed).
pub fn read_credentials(path: &Path) -> Result<Zeroizing<String>, EgressError> {
    let shown = path.display();
    let raw = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        EgressError(format!(
            "cannot read the egress proxy credentials from {shown} (--egress-proxy-credentials-file): {e}"
        ))
    })?);
    let line = raw.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(EgressError(format!(
            "{shown} is empty; it should hold user:password for the egress proxy on its first line"
        )));
    }
    if !line.contains(':') || line.chars().any(char::is_control) {
        return Err(EgressError(format!(
            "{shown} should hold user:password for the egress proxy on its first line, \
             without control characters"
        )));
    }
    Ok(Zeroizing::new(line.to_owned()))
}

/// The egress proxy in use: where it is and what to send it. Built once at start.
pub struct Egress {
    /// Proxy host name or IP literal, without brackets.
    pub proxy_host: String,
    /// Proxy port.
    pub proxy_port: u16,
    /// The flag or variable the proxy came from, for messages.
    pub source: &'static str,
    /// The `Proxy-Authorization` value (`Basic ...`), when there are credentials.
    authorization: Option<Zeroizing<String>>,
    /// Where the credentials came from, for the message when the proxy refuses them.
    credentials_from: Option<String>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("proxy", &self.proxy())
            .field("source", &self.source)
            .field("credentials_from", &self.credentials_from)
            .finish_non_exhaustive()
    }
}

impl Egress {
    /// The egress for `addr`, with the credentials from `credentials_file` (read now) or else
    /// those in the proxy URL.
    pub fn new(addr: ProxyAddr, credentials_file: Option<&Path>) -> Result<Egress, EgressError> {
        let (credentials, from) = match (credentials_file, addr.url_credentials) {
            (Some(path), _) => (
                Some(read_credentials(path)?),
                Some(path.display().to_string()),
            ),
            (None, Some(c)) => (Some(c), Some(format!("the {} URL", addr.source))),
            (None, None) => (None, None),
        };
        let authorization = credentials.map(|c| {
            let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*c));
            Zeroizing::new(format!("Basic {}", encoded.as_str()))
        });
        Ok(Egress {
            proxy_host: addr.host,
            proxy_port: addr.port,
            source: addr.source,
            authorization,
            credentials_from: from,
        })
    }

    /// `host:port` of the proxy (never its credentials), for logs and messages.
    pub fn proxy(&self) -> String {
        authority(&self.proxy_host, self.proxy_port)
    }

    /// Whether credentials are sent to the proxy.
    pub fn has_credentials(&self) -> bool {
        self.authorization.is_some()
    }

    /// A TCP stream to `host:port` through the proxy: connects to the proxy, asks for a tunnel
    /// with `CONNECT`, and returns the stream once the proxy answers 2xx. The caller bounds it
    /// in time (the connect timeout covers tunnel and handshake).
    pub async fn tunnel(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let proxy = self.proxy();
        let src = self.source;
        let mut tcp = super::pool::tcp_connect(&self.proxy_host, self.proxy_port)
            .await
            .map_err(|e| {
                ProxyError::UpstreamUnreachable(format!(
                    "cannot reach the egress proxy {proxy} ({src}): {e}"
                ))
            })?;
        let target = authority(host, port);
        let mut head = Zeroizing::new(format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: vero-proxy/{}\r\n",
            env!("CARGO_PKG_VERSION")
        ));
        if let Some(auth) = &self.authorization {
            head.push_str("Proxy-Authorization: ");
            head.push_str(auth);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let lost = |e: String| {
            ProxyError::UpstreamUnreachable(format!(
                "the egress proxy {proxy} ({src}) failed while opening a tunnel to {target}: {e}"
            ))
        };
        tcp.write_all(head.as_bytes())
            .await
            .map_err(|e| lost(e.to_string()))?;
        let answer = match read_head(&mut tcp).await {
            Ok(a) => a,
            Err(HeadError::Io(e)) => return Err(lost(e)),
            Err(HeadError::Invalid(e)) => {
                return Err(ProxyError::EgressProxyRefused(format!(
                "the egress proxy {proxy} ({src}) did not answer CONNECT {target} with HTTP: {e}"
            )))
            }
        };
        let status = format!("{} {}", answer.code, answer.reason)
            .trim_end()
            .to_owned();
        match answer.code {
            200..=299 if answer.extra == 0 => Ok(tcp),
            200..=299 => Err(ProxyError::EgressProxyRefused(format!(
                "the egress proxy {proxy} ({src}) answered {status} to CONNECT {target} but sent \
                 data before the TLS handshake began"
            ))),
            407 => Err(ProxyError::EgressProxyRefused(
                self.auth_refused(&proxy, &status, &answer),
            )),
            _ => Err(ProxyError::EgressProxyRefused(format!(
                "the egress proxy {proxy} ({src}) refused the tunnel to {target}: {status}"
            ))),
        }
    }

    fn auth_refused(&self, proxy: &str, status: &str, answer: &Head) -> String {
        let src = self.source;
        let mut msg = match &self.credentials_from {
            None => format!(
                "the egress proxy {proxy} ({src}) answered {status}: the credentials are missing; \
                 put user:password in a file and pass it with --egress-proxy-credentials-file"
            ),
            Some(from) => format!(
                "the egress proxy {proxy} ({src}) answered {status}: the credentials from {from} \
                 are wrong; correct the user:password there (--egress-proxy-credentials-file)"
            ),
        };
        if !answer.auth_schemes.is_empty()
            && !answer
                .auth_schemes
                .iter()
                .any(|s| s.eq_ignore_ascii_case("basic"))
        {
            msg.push_str(&format!(
                " (the proxy asks for {}; vero-proxy sends Basic credentials only)",
                answer.auth_schemes.join(", ")
            ));
        }
        msg
    }
}

/// `host:port`, with brackets around an IPv6 literal.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The proxy's answer head.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub code: u16,
    /// Reason phrase (possibly empty).
    pub reason: String,
    /// The schemes named by `Proxy-Authenticate` headers (`Basic`, `Negotiate`, ...).
    pub auth_schemes: Vec<String>,
    /// Bytes read past the head.
    pub extra: usize,
}

/// Why no answer head could be read.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// The connection failed or closed first.
    Io(String),
    /// Not an HTTP answer, or a head over 8 KiB.
    Invalid(String),
}

/// Reads one HTTP answer head (at most 8 KiB) with `httparse`.
pub async fn read_head<R: AsyncRead + Unpin>(io: &mut R) -> Result<Head, HeadError> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    loop {
        let n = io
            .read(&mut buf[len..])
            .await
            .map_err(|e| HeadError::Io(e.to_string()))?;
        if n == 0 {
            return Err(HeadError::Io(if len == 0 {
                "it closed the connection without answering".into()
            } else {
                "it closed the connection in the middle of its answer".into()
            }));
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(end)) => {
                let auth_schemes = resp
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("proxy-authenticate"))
                    .filter_map(|h| std::str::from_utf8(h.value).ok())
                    .filter_map(|v| v.split_whitespace().next())
                    .map(|s| s.trim_end_matches(',').to_owned())
                    .collect();
                return Ok(Head {
                    code: resp.code.unwrap_or(0),
                    reason: resp.reason.unwrap_or("").chars().take(200).collect(),
                    auth_schemes,
                    extra: len - end,
                });
            }
            Ok(httparse::Status::Partial) if len < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(HeadError::Invalid(format!(
                    "its answer head is longer than {MAX_HEAD} bytes"
                )))
            }
            Err(e) => return Err(HeadError::Invalid(e.to_string())),
        }
    }
}
