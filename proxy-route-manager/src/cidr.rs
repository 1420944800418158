//! An IP network as iptables prints it (`ADDR/LEN`, host bits cleared), so rules rendered here compare
//! equal, text for text, with what `iptables-save` reports back.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 network with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// A single host (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix }
    }

    /// Parses `ADDR` or `ADDR/LEN`. Returns the network and whether host bits had to be cleared, or
    /// `None` when the text is not an address or the length is too long.
    pub fn parse(text: &str) -> Option<(Cidr, bool)> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, len)) => (addr.parse::<IpAddr>().ok()?, Some(len.parse::<u8>().ok()?)),
            None => (text.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return None;
        }
        let network = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(u32::from(32 - prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(u32::from(128 - prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Some((
            Cidr {
                addr: network,
                prefix,
            },
            network != addr,
        ))
    }

    /// Whether this is an IPv6 network.
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(text: &str) -> Option<(String, bool)> {
        Cidr::parse(text).map(|(c, cleared)| (c.to_string(), cleared))
    }

    #[test]
    fn renders_like_iptables_save() {
        assert_eq!(
            show("169.254.169.254"),
            Some(("169.254.169.254/32".into(), false))
        );
        assert_eq!(show("10.0.0.0/8"), Some(("10.0.0.0/8".into(), false)));
        assert_eq!(show("10.1.2.3/8"), Some(("10.0.0.0/8".into(), true)));
        assert_eq!(show("0.0.0.0/0"), Some(("0.0.0.0/0".into(), false)));
        assert_eq!(
            show("fd00:ec2::254"),
            Some(("fd00:ec2::254/128".into(), false))
        );
        assert_eq!(
            show("2001:db8:0:0::1/64"),
            Some(("2001:db8::/64".into(), true))
        );
        assert_eq!(show("::/0"), Some(("::/0".into(), false)));
    }

    #[test]
    fn rejects_what_is_not_a_network() {
        for bad in [
            "",
            "10.0.0",
            "10.0.0.1/33",
            "::1/129",
            "10.0.0.1/",
            "/8",
            "10.0.0.1/-1",
            "host",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }
}
