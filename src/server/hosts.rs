//! The `Host` check that stops DNS rebinding: a web page on `evil.example` whose name is made to resolve to
//! 127.0.0.1 could otherwise drive a key-less server on the user's loopback from their browser. The browser still
//! sends `Host: evil.example`, so a server without a key answers only loopback host names (`localhost`,
//! `*.localhost`, `127.x.x.x`, `[::1]`) unless `--allowed-hosts` names others. With a key the key is the
//! protection, and every host is accepted unless `--allowed-hosts` is given. A request without `Host` (HTTP/1.0
//! tools; browsers always send it) is accepted.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::errors::ApiError;

/// Which `Host` headers are answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedHosts {
    Any,
    /// Loopback names and these (lowercase, without port; `*` would be [`AllowedHosts::Any`]).
    LoopbackAnd(Vec<String>),
}

impl AllowedHosts {
    /// The policy for a server: `--allowed-hosts` if given (`*` accepts any), otherwise loopback only without a
    /// key and any host with one.
    pub fn for_server(listed: Option<&[String]>, has_key: bool) -> Self {
        match listed {
            Some(names) if names.iter().any(|n| n.trim() == "*") => Self::Any,
            Some(names) => Self::LoopbackAnd(
                names.iter().map(|n| strip_port(n.trim()).to_ascii_lowercase()).filter(|n| !n.is_empty()).collect(),
            ),
            None if has_key => Self::Any,
            None => Self::LoopbackAnd(Vec::new()),
        }
    }

    /// Whether a request with this `Host` header value is answered.
    pub fn allows(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::LoopbackAnd(names) => {
                let name = strip_port(host.trim()).to_ascii_lowercase();
                is_loopback_name(&name) || names.contains(&name)
            }
        }
    }
}

/// `example.com:8080` → `example.com`, `[::1]:80` → `[::1]`, `::1` stays.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_loopback_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Middleware: 403 naming the host and the flag when the `Host` header is not allowed.
pub async fn check_host(State(allowed): State<std::sync::Arc<AllowedHosts>>, request: Request, next: Next) -> Response {
    if let Some(host) = request.headers().get(header::HOST) {
        let host = String::from_utf8_lossy(host.as_bytes());
        if !allowed.allows(&host) {
            let shown: String = host.chars().take(100).collect();
            return ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                format!(
                    "host {shown:?} is not served: without an API key this server answers only loopback host names \
                     (localhost, 127.0.0.1, [::1]); start it with --allowed-hosts {shown} or with an API key"
                ),
            )
            .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyless_servers_answer_loopback_names_only() {
        let policy = AllowedHosts::for_server(None, false);
        for ok in [
            "localhost",
            "localhost:7860",
            "127.0.0.1:7860",
            "127.1.2.3",
            "[::1]:7860",
            "[::1]",
            "a.localhost",
            "LOCALHOST.",
        ] {
            assert!(policy.allows(ok), "{ok}");
        }
        for bad in
            ["evil.example", "evil.example:7860", "192.168.1.2", "localhost.evil.example", "127.0.0.1.nip.io", "[::2]"]
        {
            assert!(!policy.allows(bad), "{bad}");
        }
    }

    #[test]
    fn listed_hosts_and_keys() {
        let listed = ["Gpu-Box.lan".to_string(), "10.0.0.5:7860".to_string()];
        let policy = AllowedHosts::for_server(Some(&listed), false);
        assert!(policy.allows("gpu-box.lan:7860") && policy.allows("10.0.0.5") && policy.allows("localhost"));
        assert!(!policy.allows("other.lan"));
        assert_eq!(AllowedHosts::for_server(None, true), AllowedHosts::Any);
        assert_eq!(AllowedHosts::for_server(Some(&["*".to_string()]), false), AllowedHosts::Any);
        assert!(
            !AllowedHosts::for_server(Some(&listed), true).allows("other.lan"),
            "listed hosts apply with a key too"
        );
    }
}
