//! Which requests may pass: not an open proxy, and not a door for web pages. Loopback is not
//! authentication: a page in a browser on the same machine can reach 127.0.0.1 (cross-site form
//! posts, DNS rebinding), and everything that passes is signed with the organisation's certificate.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

use http::uri::Authority;
use http::{header, Request};

use crate::config::{ListenAddr, UpstreamTarget};
use crate::error::ProxyError;

/// The names requests may carry in `Host` and `Origin`.
#[derive(Debug, Clone)]
pub struct Gate {
    names: HashSet<String>,
    listen_ip: Option<IpAddr>,
    /// The listen address as text, for `usual_local_host`.
    listen_text: Option<String>,
}

/// The host part of an authority, lower case, without brackets, port or trailing dot (copied
/// only when it has upper-case letters).
fn host_of(authority: &Authority) -> Cow<'_, str> {
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Browsers' `Sec-Fetch-Site` request header.
static SEC_FETCH_SITE: header::HeaderName = header::HeaderName::from_static("sec-fetch-site");

impl Gate {
    /// A gate that admits localhost, every loopback address, the listen address and `extra`.
    pub fn new(listen: &ListenAddr, extra: &[String]) -> Self {
        let mut names: HashSet<String> = extra.iter().cloned().collect();
        names.insert("localhost".into());
        let listen_ip = match listen {
            ListenAddr::Tcp(a) => Some(a.ip()),
            ListenAddr::Unix(_) => None,
        };
        Gate {
            names,
            listen_ip,
            listen_text: listen_ip.map(|ip| ip.to_string()),
        }
    }

    /// A `Host` almost every local application sends: `localhost`, `127.0.0.1` or the listen
    /// address, with or without a port. Settled without parsing it as an authority (which
    /// copies it); every other value takes the full check, which admits these too.
    fn usual_local_host(&self, raw: &[u8]) -> bool {
        let host = match raw.iter().rposition(|&b| b == b':') {
            Some(i) => {
                let port = &raw[i + 1..];
                let number = port.iter().try_fold(0u32, |n, &d| {
                    d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
                });
                if !(1..=5).contains(&port.len()) || number.is_none_or(|n| n > 65535) {
                    return false;
                }
                &raw[..i]
            }
            None => raw,
        };
        host.eq_ignore_ascii_case(b"localhost")
            || host == b"127.0.0.1"
            || self
                .listen_text
                .as_ref()
                .is_some_and(|l| l.as_bytes() == host)
    }

    /// Whether `host` (no port) is a name the proxy answers to.
    pub fn allows_host(&self, host: &str) -> bool {
        // An address first: the usual Host (127.0.0.1) is settled without hashing the name.
        if let Ok(ip) = host.parse::<IpAddr>() {
            if crate::config::is_loopback(ip) || Some(ip) == self.listen_ip {
                return true;
            }
        }
        self.names.contains(host) || host.ends_with(".localhost")
    }

    /// Refuses CONNECT-like misuse, foreign authorities, unknown Host names and cross-site
    /// requests. `browser_headers`: whether the request carries `Origin` or `Sec-Fetch-Site`
    /// (the caller has looked at every header name once already, and a lookup of an absent
    /// name still hashes it).
    pub fn check<B>(
        &self,
        req: &Request<B>,
        target: &UpstreamTarget,
        browser_headers: bool,
    ) -> Result<(), ProxyError> {
        // Absolute-form (or an HTTP/2 :authority): it must name us or the upstream.
        let mut host_checked = false;
        if let Some(auth) = req.uri().authority() {
            let host = host_of(auth);
            let upstream = host.eq_ignore_ascii_case(&target.host)
                && auth.port_u16().is_none_or(|p| p == target.port || p == 80);
            if req.version() != http::Version::HTTP_2 && !upstream && !self.allows_host(&host) {
                return Err(ProxyError::ForeignAuthority {
                    requested: auth.to_string(),
                    upstream: target.authority.to_string(),
                });
            }
            if upstream {
                host_checked = true;
            } else if !self.allows_host(&host) {
                return Err(ProxyError::ForbiddenHost(auth.to_string()));
            }
        }
        if !host_checked {
            if let Some(h) = req.headers().get(header::HOST) {
                if !self.usual_local_host(h.as_bytes()) {
                    let raw = h.to_str().unwrap_or("");
                    let ok = raw
                        .parse::<Authority>()
                        .map(|a| self.allows_host(&host_of(&a)))
                        .unwrap_or(false);
                    if !ok {
                        return Err(ProxyError::ForbiddenHost(raw.to_owned()));
                    }
                }
            }
        }
        if browser_headers {
            self.browser_checks(req)?;
        }
        Ok(())
    }

    /// Refuses what a web page sent: a cross-site fetch, or an origin that is not ours.
    fn browser_checks<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        if let Some(site) = req.headers().get(&SEC_FETCH_SITE) {
            if site.as_bytes().eq_ignore_ascii_case(b"cross-site") {
                return Err(ProxyError::CrossSiteRequest(
                    "a web browser sent this request from another site (Sec-Fetch-Site: cross-site); \
                     vero-proxy serves local applications, not web pages"
                        .into(),
                ));
            }
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let raw = origin.to_str().unwrap_or("");
            let allowed = raw
                .parse::<http::Uri>()
                .ok()
                .is_some_and(|u| u.authority().is_some_and(|a| self.allows_host(&host_of(a))));
            if !allowed {
                return Err(ProxyError::CrossSiteRequest(format!(
                    "a web page from origin {raw:?} sent this request; vero-proxy serves local \
                     applications, not web pages (add the name with --allowed-host if it is yours)"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn target() -> UpstreamTarget {
        crate::config::parse_upstream("test").unwrap()
    }

    fn gate() -> Gate {
        Gate::new(
            &ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()),
            &["proxy.internal".into()],
        )
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn code(r: Result<(), ProxyError>) -> &'static str {
        r.err().map(|e| e.code()).unwrap_or("ok")
    }

    #[test]
    fn loopback_names_pass() {
        let g = gate();
        for h in [
            "localhost:8080",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:8080",
            "LOCALHOST",
            "proxy.internal",
        ] {
            assert_eq!(
                code(g.check(&req("/x", &[("host", h)]), &target(), true)),
                "ok",
                "{h}"
            );
        }
        assert_eq!(
            code(g.check(&req("/x", &[]), &target(), true)),
            "ok",
            "HTTP/1.0 without Host"
        );
    }

    #[test]
    fn the_usual_local_hosts_are_settled_without_parsing_and_nothing_else_is() {
        let g = Gate::new(&ListenAddr::Tcp("192.0.2.7:8080".parse().unwrap()), &[]);
        for h in [
            "localhost",
            "LocalHost:8080",
            "127.0.0.1",
            "127.0.0.1:65535",
            "192.0.2.7:1",
        ] {
            assert!(g.usual_local_host(h.as_bytes()), "{h}");
        }
        for h in [
            "localhost:",
            "localhost:65536",
            "localhost:123456",
            "localhost:8o",
            "localhost.:80",
            "127.0.0.1.evil:80",
            "[::1]:80",
            "::1",
            "evil.example",
            "192.0.2.8:80",
        ] {
            assert!(!g.usual_local_host(h.as_bytes()), "{h}");
        }
    }

    #[test]
    fn rebinding_names_are_refused() {
        let g = gate();
        for h in [
            "evil.example:8080",
            "attacker.localhost.evil",
            "10.0.0.1:8080",
        ] {
            assert_eq!(
                code(g.check(&req("/x", &[("host", h)]), &target(), true)),
                "forbidden_host",
                "{h}"
            );
        }
    }

    #[test]
    fn absolute_form_must_name_the_upstream_or_us() {
        let g = gate();
        assert_eq!(
            code(g.check(&req("http://example.com/x", &[]), &target(), true)),
            "foreign_authority"
        );
        assert_eq!(
            code(g.check(
                &req("http://apitest.vero.fi/x", &[("host", "apitest.vero.fi")]),
                &target(),
                true
            )),
            "ok"
        );
        assert_eq!(
            code(g.check(&req("http://localhost:8080/x", &[]), &target(), true)),
            "ok"
        );
    }

    #[test]
    fn browsers_from_other_sites_are_refused() {
        let g = gate();
        let h = [("host", "localhost:8080"), ("sec-fetch-site", "cross-site")];
        assert_eq!(
            code(g.check(&req("/x", &h), &target(), true)),
            "cross_site_request"
        );
        let h = [
            ("host", "localhost:8080"),
            ("origin", "https://evil.example"),
        ];
        assert_eq!(
            code(g.check(&req("/x", &h), &target(), true)),
            "cross_site_request"
        );
        let h = [("host", "localhost:8080"), ("origin", "null")];
        assert_eq!(
            code(g.check(&req("/x", &h), &target(), true)),
            "cross_site_request"
        );
        let h = [
            ("host", "localhost:8080"),
            ("origin", "http://localhost:3000"),
            ("sec-fetch-site", "same-site"),
        ];
        assert_eq!(code(g.check(&req("/x", &h), &target(), true)), "ok");
    }
}
