//! [`PeerAddress`]: where a peer is dialled, `host:port`. The host is an IP
//! address or a DNS name; a name is resolved at every connection attempt,
//! so a peer whose name moves to another IP (a rescheduled container) is
//! followed without a restart.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::ServerName;

/// The longest DNS name accepted, in bytes (RFC 1035).
const NAME_BYTES_MAX: usize = 253;
/// The longest label of a DNS name, in bytes (RFC 1035).
const LABEL_BYTES_MAX: usize = 63;

/// Looks peers' host names up in place of the system's resolver: service
/// discovery of one's own, or a test that moves a name. It is called at
/// every dial of a peer given by name, with the name and the port, and
/// should answer quickly (it runs on the transport's runtime).
#[derive(Clone)]
pub struct Resolver(Arc<ResolveFn>);

type ResolveFn = dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync;

impl Resolver {
    /// A resolver that answers with `lookup`.
    pub fn new(
        lookup: impl Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> Resolver {
        Resolver(Arc::new(lookup))
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver(..)")
    }
}

/// A peer's address: an IP address or a DNS name, and a non-zero port.
/// Names are kept in lower case (DNS is case-insensitive), so two
/// spellings of one name compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddress {
    host: Host,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

impl PeerAddress {
    /// The address itself when the host is an IP address; `None` for a
    /// name, which only resolution turns into addresses.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match &self.host {
            Host::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            Host::Name(_) => None,
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host as written in the address: an IP address (IPv6 without
    /// brackets) or a name.
    pub fn host(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name.clone(),
        }
    }

    /// Whether the host is a name rather than an IP address.
    pub fn is_name(&self) -> bool {
        matches!(self.host, Host::Name(_))
    }

    /// The addresses the host stands for now, in the resolver's order. An
    /// IP address stands for itself; a name is looked up (the system
    /// resolver, on a blocking thread). An empty answer is an error.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.resolve_with(None).await
    }

    /// [`PeerAddress::resolve`], asking `resolver` about a name instead of
    /// the system's resolver when one is given.
    pub async fn resolve_with(
        &self,
        resolver: Option<&Resolver>,
    ) -> std::io::Result<Vec<SocketAddr>> {
        let addresses: Vec<SocketAddr> = match (&self.host, resolver) {
            (Host::Ip(ip), _) => vec![SocketAddr::new(*ip, self.port)],
            (Host::Name(name), Some(resolver)) => {
                (resolver.0)(name, self.port).map_err(|error| {
                    std::io::Error::new(error.kind(), format!("resolve {name:?}: {error}"))
                })?
            }
            (Host::Name(name), None) => tokio::net::lookup_host((name.as_str(), self.port))
                .await
                .map_err(|error| {
                    std::io::Error::new(error.kind(), format!("resolve {name:?}: {error}"))
                })?
                .collect(),
        };
        if addresses.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{self} resolves to no address"),
            ));
        }
        Ok(addresses)
    }

    /// The name a peer's TLS certificate must carry when no override is
    /// configured: the IP address or the name the peer is dialled on.
    pub fn tls_server_name(&self) -> Option<ServerName<'static>> {
        match &self.host {
            Host::Ip(ip) => Some(ServerName::IpAddress((*ip).into())),
            Host::Name(name) => ServerName::try_from(name.clone()).ok(),
        }
    }
}

impl From<SocketAddr> for PeerAddress {
    fn from(address: SocketAddr) -> PeerAddress {
        PeerAddress {
            host: Host::Ip(address.ip()),
            port: address.port(),
        }
    }
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

/// Why a text is not a [`PeerAddress`]; the message says what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressError(String);

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AddressError {}

impl FromStr for PeerAddress {
    type Err = AddressError;

    /// `ip:port`, `[ipv6]:port` or `name:port`, with a port from 1 to
    /// 65535 in decimal digits and nothing around it (no scheme, path or
    /// spaces). A name's trailing dot is dropped: `node1.` is `node1`.
    fn from_str(text: &str) -> Result<PeerAddress, AddressError> {
        let fail = |why: &str| Err(AddressError(format!("{text:?} is not host:port: {why}")));
        if text.contains("://") {
            return fail("give host:port, without a scheme");
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return fail("no port");
        };
        if host.starts_with('[') && !host.ends_with(']') {
            return fail("not an IPv6 address in brackets followed by a port");
        }
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return fail("the port must be a number from 1 to 65535");
        }
        let Ok(port) = port.parse::<u16>() else {
            return fail("the port must be a number from 1 to 65535");
        };
        if port == 0 {
            return fail("the port must not be 0");
        }
        if host.is_empty() {
            return fail("no host");
        }
        if let Ok(address) = text.parse::<SocketAddr>() {
            if let SocketAddr::V6(v6) = address {
                if v6.scope_id() != 0 {
                    return fail("scoped IPv6 addresses (with %) are not supported");
                }
            }
            return Ok(PeerAddress::from(address));
        }
        if host.starts_with('[') {
            return fail("not an IPv6 address in brackets followed by a port");
        }
        if host.parse::<IpAddr>().is_ok() || host.contains(':') {
            // An IPv6 address without brackets, or a stray colon.
            return fail("write an IPv6 address in brackets, as [::1]:5012");
        }
        let name = host.strip_suffix('.').unwrap_or(host);
        if let Err(why) = check_name(name) {
            return fail(&why);
        }
        Ok(PeerAddress {
            host: Host::Name(name.to_ascii_lowercase()),
            port,
        })
    }
}

/// A host name without its trailing dot: dot-separated labels of ASCII
/// letters, digits, `-` and `_` (container runtimes allow it in names
/// their DNS serves), none empty or longer than 63 bytes, none starting or
/// ending with `-`, 253 bytes at most, and a last label that is not all
/// digits (`1.2.3` is an IPv4 address that did not parse, and TLS refuses
/// such names).
fn check_name(name: &str) -> Result<(), String> {
    if name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "the host name is longer than {NAME_BYTES_MAX} bytes"
        ));
    }
    if name.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!("{name:?} is not a valid IP address"));
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|last| !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "the last label of {name:?} is all digits, which no host name's is"
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("the host name has an empty label".into());
        }
        if label.len() > LABEL_BYTES_MAX {
            return Err(format!(
                "a label of the host name is longer than {LABEL_BYTES_MAX} bytes"
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("{bad:?} may not appear in a host name"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label of the host name starts or ends with '-'".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PeerAddress, AddressError> {
        text.parse()
    }

    #[test]
    fn ip_addresses_and_names_parse_and_print_back() {
        for text in [
            "127.0.0.1:5012",
            "[::1]:5012",
            "node-1:5012",
            "regatta-0.regatta.default.svc.cluster.local:5012",
            "project_node_1:1",
            "localhost:65535",
        ] {
            let address = parse(text).expect(text);
            assert_eq!(address.to_string(), text);
            assert_eq!(parse(&address.to_string()), Ok(address));
        }
        let ip = parse("10.0.0.7:5012").expect("ip");
        assert_eq!(
            ip.socket_addr(),
            Some("10.0.0.7:5012".parse().expect("addr"))
        );
        assert!(!ip.is_name());
        let name = parse("Node1.Example:5012").expect("name");
        assert_eq!(name, parse("node1.example:5012").expect("name"));
        assert_eq!(name, parse("node1.example.:5012").expect("trailing dot"));
        assert_eq!(name.to_string(), "node1.example:5012");
        assert_eq!(name.socket_addr(), None);
        assert!(name.is_name());
        assert_eq!(name.host(), "node1.example");
        assert_eq!(name.port(), 5012);
    }

    #[test]
    fn bad_addresses_are_refused_with_the_reason() {
        for (text, why) in [
            ("127.0.0.1", "no port"),
            ("node1", "no port"),
            ("node1:", "the port must be a number"),
            ("node1:0", "the port must not be 0"),
            ("127.0.0.1:0", "the port must not be 0"),
            ("node1:65536", "the port must be a number"),
            (":5012", "no host"),
            ("http://node1:5012", "without a scheme"),
            ("::1:5012", "in brackets"),
            ("[::1]", "brackets"),
            ("node 1:5012", "' ' may not appear"),
            ("node1/x:5012", "'/' may not appear"),
            ("-node:5012", "starts or ends with '-'"),
            ("a..b:5012", "empty label"),
            ("300.1.1.1:5012", "not a valid IP address"),
            ("1.2.3:5012", "not a valid IP address"),
            ("rack.1:5012", "all digits"),
            ("node1:+5012", "the port must be a number"),
            ("127.0.0.1:+5012", "the port must be a number"),
            ("[fe80::1%2]:5012", "scoped IPv6"),
            ("[::1:5012", "brackets"),
        ] {
            let error = parse(text).expect_err(text).to_string();
            assert!(error.contains(why), "{text:?}: {error}");
        }
        let long_label = format!("{}:1", "a".repeat(64));
        assert!(parse(&long_label).is_err());
        let long_name = format!("{}:1", ["a"; 130].join("."));
        assert!(parse(&long_name).is_err());
        // Every name accepted is one TLS accepts.
        for text in ["a_b.c-d:1", "x.y1:1", "node.:1", "1a:1"] {
            let address = parse(text).expect(text);
            assert!(address.tls_server_name().is_some(), "{text}");
        }
    }

    #[tokio::test]
    async fn a_name_resolves_and_an_ip_stands_for_itself() {
        let ip = parse("127.0.0.1:5012").expect("ip");
        assert_eq!(
            ip.resolve().await.expect("resolve"),
            vec!["127.0.0.1:5012".parse::<SocketAddr>().expect("addr")]
        );
        let name = parse("localhost:5012").expect("name");
        let resolved = name.resolve().await.expect("resolve localhost");
        assert!(
            resolved
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 5012),
            "{resolved:?}"
        );
    }

    #[test]
    fn the_tls_name_is_the_host_it_is_dialled_on() {
        let ip = parse("127.0.0.1:1").expect("ip");
        assert!(matches!(
            ip.tls_server_name(),
            Some(ServerName::IpAddress(_))
        ));
        let name = parse("node1.example:1").expect("name");
        assert_eq!(
            name.tls_server_name(),
            Some(ServerName::try_from("node1.example").expect("dns name"))
        );
    }
}
