//! `--allow-image-urls`: the hosted API accepts an image URL in `image` / `mask`; this server fetches one only when
//! started with that flag, and never from an address that is not public (loopback, private, link-local, CGNAT,
//! unique-local, multicast, documentation, unspecified): the resolver refuses such a host before any connection, and
//! the connection goes to exactly the addresses it checked (no second lookup to rebind). No redirects are followed,
//! the answer is capped at the body limit and must arrive within a timeout.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::{Error, Result};

/// How long a fetch may take, connection and answer together.
const TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `value` is an http(s) URL rather than base64 data.
pub fn is_url(value: &str) -> bool {
    let v = value.trim_start();
    v.starts_with("http://") || v.starts_with("https://")
}

/// Whether `ip` is a public unicast address (the only kind fetched from).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
                || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
                || (a == 198 && (b == 18 || b == 19)) // benchmarking 198.18/15
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
                || first == 0x2001 && v6.segments()[1] == 0x0db8 // documentation
                || first == 0x0064 && v6.segments()[1] == 0xff9b) // NAT64, which can reach private IPv4
        }
    }
}

/// Resolves `host:port` and refuses it unless every address is public.
fn resolve_public(address: &str) -> std::io::Result<Vec<SocketAddr>> {
    let addresses: Vec<SocketAddr> = address.to_socket_addrs()?.collect();
    if addresses.is_empty() {
        return Err(std::io::Error::other(format!("{address} does not resolve")));
    }
    if let Some(bad) = addresses.iter().find(|a| !is_public(a.ip())) {
        return Err(std::io::Error::other(format!(
            "{address} resolves to {}, which is not a public address (never fetched from)",
            bad.ip()
        )));
    }
    Ok(addresses)
}

/// The bytes at `url` for request field `field`, at most `limit` of them. Errors are the request's fault
/// ([`Error::InvalidRequest`] naming the field): an address that is not public, no answer, an error status, too
/// large.
pub fn fetch(field: &'static str, url: &str, limit: usize) -> Result<Vec<u8>> {
    let bad = |message: String| Error::invalid(field, message);
    let url = url.trim();
    let agent = ureq::AgentBuilder::new().resolver(resolve_public).redirects(0).timeout(TIMEOUT).build();
    let answer = agent.get(url).call().map_err(|e| bad(format!("could not fetch {url}: {e}")))?;
    if answer.status() != 200 {
        return Err(bad(format!("fetching {url} answered {} (not 200)", answer.status())));
    }
    let mut bytes = Vec::new();
    answer
        .into_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("reading {url}: {e}")))?;
    if bytes.len() > limit {
        return Err(bad(format!("{url} is larger than the {limit}-byte limit")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn private_hosts_are_refused_before_connecting() {
        for url in ["http://127.0.0.1:9/x.png", "http://localhost:9/x.png", "http://[::1]:9/x.png", "http://10.0.0.1/x"]
        {
            let e = fetch("image", url, 1000).unwrap_err().to_string();
            assert!(e.contains("image") && e.contains("not a public address"), "{url}: {e}");
        }
    }
}
