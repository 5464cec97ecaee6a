//! The client's address behind reverse proxies.
//!
//! `X-Forwarded-For` (or RFC 7239 `Forwarded: for=`) is believed only when
//! the connection comes from a configured trusted proxy
//! (`KEEL_TRUSTED_PROXIES`), and then only as far as the chain stays
//! trusted: the client is the rightmost address that is not a trusted
//! proxy. The leftmost entry is whatever the client chose to write, so it
//! is never taken while an untrusted hop stands to its right.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// Which header the trusted proxies write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedHeader {
    XForwardedFor,
    Forwarded,
}

impl ForwardedHeader {
    pub fn parse(value: &str) -> Result<ForwardedHeader, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            other => Err(format!("{other:?} is neither x-forwarded-for nor forwarded")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrustedProxies {
    ranges: Vec<IpNet>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// `ranges`: comma-separated addresses or CIDR ranges (`10.0.0.0/8, ::1`).
    pub fn parse(ranges: &str, header: ForwardedHeader) -> Result<TrustedProxies, String> {
        let ranges = ranges
            .split(',')
            .map(str::trim)
            .filter(|range| !range.is_empty())
            .map(|range| {
                range
                    .parse::<IpNet>()
                    .or_else(|_| range.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{range:?} is not an address or a CIDR range"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies { ranges, header })
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    fn trusts(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.ranges.iter().any(|range| range.contains(&address))
    }

    /// The client's address for a connection from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let hops = match self.header {
            ForwardedHeader::XForwardedFor => forwarded_for(headers),
            ForwardedHeader::Forwarded => forwarded(headers),
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            // A hop a trusted proxy could not name (`unknown`, an obfuscated
            // identifier, garbage): nothing to its left can be believed.
            let Some(address) = hop else { return client };
            client = canonical(*address);
            if !self.trusts(client) {
                return client;
            }
        }
        client
    }
}

/// `::ffff:1.2.3.4` is 1.2.3.4.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// Every `X-Forwarded-For` entry, in order, across repeated headers.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("\u{0}").split(','))
        .map(|entry| parse_node(entry.trim()))
        .collect()
}

/// The `for=` of every `Forwarded` element, in order: one hop per element,
/// and an element that names no `for=` is a hop nobody named (`None`), so
/// the hops to its left keep their places.
fn forwarded(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(http::header::FORWARDED)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("for=\u{0}").split(','))
        .map(|element| {
            element
                .split(';')
                .find_map(|pair| {
                    let (name, value) = pair.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| parse_node(value.trim().trim_matches('"')))
                })
                .flatten()
        })
        .collect()
}

/// `1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]:443`, `2001:db8::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(address) = node.parse::<IpAddr>() {
        return Some(address);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// `keel edge` in front of a remote keel: the upstream learns the client's
/// address (as this edge resolved it, trusted proxies and all) from an
/// `X-Forwarded-For` of one entry, which replaces whatever forwarding
/// headers the call carried. The upstream believes it when it trusts the
/// edge (`KEEL_TRUSTED_PROXIES`, with the default `x-forwarded-for`).
pub fn forward_client_address<B>(mut request: http::Request<B>) -> http::Request<B> {
    let client = request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr)
        .map(|address| canonical(address.ip()));
    let headers = request.headers_mut();
    headers.remove(http::header::FORWARDED);
    headers.remove("x-real-ip");
    match client.and_then(|client| http::HeaderValue::from_str(&client.to_string()).ok()) {
        Some(value) => {
            headers.insert(http::header::HeaderName::from_static("x-forwarded-for"), value);
        }
        None => {
            headers.remove("x-forwarded-for");
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(name, http::HeaderValue::from_static(value));
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let proxies = TrustedProxies::parse("10.0.0.0/8, 127.0.0.1", ForwardedHeader::XForwardedFor).unwrap();
        let xff = |values| headers("x-forwarded-for", values);
        // The client wrote 6.6.6.6 itself; the trusted proxy saw 203.0.113.7.
        assert_eq!(
            proxies.client(ip("10.1.2.3"), &xff(&["6.6.6.6, 203.0.113.7"])),
            ip("203.0.113.7")
        );
        // Two trusted proxies in a row; headers repeated.
        assert_eq!(
            proxies.client(ip("127.0.0.1"), &xff(&["6.6.6.6, 203.0.113.7", "10.9.9.9"])),
            ip("203.0.113.7")
        );
        // Not from a trusted proxy: the header is the client's own words.
        assert_eq!(
            proxies.client(ip("198.51.100.1"), &xff(&["1.1.1.1"])),
            ip("198.51.100.1")
        );
        // Garbage stops the walk at the last hop believed.
        assert_eq!(
            proxies.client(ip("10.0.0.1"), &xff(&["1.1.1.1, nonsense"])),
            ip("10.0.0.1")
        );
        // Ports and mapped addresses.
        assert_eq!(
            proxies.client(ip("10.0.0.1"), &xff(&["203.0.113.7:4711"])),
            ip("203.0.113.7")
        );
        assert_eq!(
            proxies.client(ip("::ffff:10.0.0.1"), &xff(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        // No header at all: the proxy itself.
        assert_eq!(proxies.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_for_is_read_the_same_way() {
        let proxies = TrustedProxies::parse("10.0.0.0/8", ForwardedHeader::Forwarded).unwrap();
        let value = headers(
            "forwarded",
            &[r#"for=6.6.6.6, for="[2001:db8::7]:80";proto=https, for=10.0.0.2;by=10.0.0.1"#],
        );
        assert_eq!(proxies.client(ip("10.0.0.1"), &value), ip("2001:db8::7"));
        let unknown = headers("forwarded", &["for=6.6.6.6, for=unknown"]);
        assert_eq!(proxies.client(ip("10.0.0.1"), &unknown), ip("10.0.0.1"));
        // A trusted proxy's element without `for=` is a hop it did not name:
        // the client's own element to its left is not believed.
        let unnamed = headers("forwarded", &["for=6.6.6.6, proto=https"]);
        assert_eq!(proxies.client(ip("10.0.0.1"), &unnamed), ip("10.0.0.1"));
        // X-Forwarded-For is ignored when Forwarded is the configured header.
        assert_eq!(
            proxies.client(ip("10.0.0.1"), &headers("x-forwarded-for", &["6.6.6.6"])),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(TrustedProxies::parse("10.0.0.0/33", ForwardedHeader::XForwardedFor).is_err());
        assert!(TrustedProxies::parse("localhost", ForwardedHeader::XForwardedFor).is_err());
        assert!(
            TrustedProxies::parse("", ForwardedHeader::XForwardedFor)
                .unwrap()
                .is_empty()
        );
    }
}
