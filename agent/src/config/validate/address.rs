//! Which addresses may be a VIP, a backend or an `snat_ip` at all, and the
//! CIDRs of allow-lists. One rule for the config file and for discovery
//! (DNS, etcd, Kubernetes): an address that only this host, this link or a
//! group of hosts can mean is never balanced to or from.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// A kind of address that is refused as a VIP, a backend and an `snat_ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedClass {
    /// 0.0.0.0/8 ("this network"), `::`.
    Unspecified,
    /// 127.0.0.0/8, `::1`: this host only.
    Loopback,
    /// 169.254.0.0/16, fe80::/10: this link only (and where cloud metadata
    /// services live).
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// A cloud instance-metadata address (AWS, GCP, Azure and Oracle use
    /// 169.254.169.254, AWS fd00:ec2::254 over IPv6, Alibaba
    /// 100.100.100.200): credentials live there.
    Metadata,
}

impl fmt::Display for RefusedClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "an unspecified address (0.0.0.0/8, ::)",
            Self::Loopback => "a loopback address",
            Self::LinkLocal => "a link-local address",
            Self::Multicast => "a multicast address",
            Self::Broadcast => "the broadcast address",
            Self::Metadata => "a cloud metadata address",
        })
    }
}

/// Instance-metadata services of the big clouds.
const METADATA: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
];

/// Why `ip` can't be a VIP, a backend or an `snat_ip`; None when it can.
/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is judged as the IPv4
/// address it carries.
pub fn refused_class(ip: IpAddr) -> Option<RefusedClass> {
    if METADATA.contains(&ip) {
        return Some(RefusedClass::Metadata);
    }
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => refused_class(v4.into()),
            None if v6.is_unspecified() => Some(RefusedClass::Unspecified),
            None if v6.is_loopback() => Some(RefusedClass::Loopback),
            None if v6.is_unicast_link_local() => Some(RefusedClass::LinkLocal),
            None if v6.is_multicast() => Some(RefusedClass::Multicast),
            None => None,
        },
    }
}

fn v4_class(v4: Ipv4Addr) -> Option<RefusedClass> {
    if v4.octets()[0] == 0 {
        Some(RefusedClass::Unspecified)
    } else if v4.is_loopback() {
        Some(RefusedClass::Loopback)
    } else if v4.is_link_local() {
        Some(RefusedClass::LinkLocal)
    } else if v4.is_multicast() {
        Some(RefusedClass::Multicast)
    } else if v4.is_broadcast() {
        Some(RefusedClass::Broadcast)
    } else {
        None
    }
}

/// An address block, `ADDRESS/PREFIX` with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `192.0.2.0/24` or `2001:db8::/64`; a bare address is a
    /// block of one. The error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| "expected ADDRESS/PREFIX (e.g. 192.0.2.0/24)".to_string())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("the prefix length must be 0 to {max}"))?,
        };
        let cidr = Self { network, prefix };
        let masked = cidr.masked(network);
        if masked != network {
            return Err(format!("host bits are set: the block is {masked}/{prefix}"));
        }
        Ok(cidr)
    }

    /// As `parse`, but host bits are cleared instead of refused
    /// (`10.1.2.3/8` is `10.0.0.0/8`), as kube-proxy reads
    /// `loadBalancerSourceRanges`.
    pub fn parse_sloppy(text: &str) -> Result<Self, String> {
        match Self::parse(text) {
            Err(_) if text.contains('/') => {
                let (addr, prefix) = text.split_once('/').unwrap_or((text, ""));
                let network: IpAddr = addr
                    .trim()
                    .parse()
                    .map_err(|_| "expected ADDRESS/PREFIX".to_string())?;
                let prefix: u8 = prefix
                    .trim()
                    .parse()
                    .map_err(|_| "expected ADDRESS/PREFIX".to_string())?;
                let cidr = Self { network, prefix };
                let max = if network.is_ipv4() { 32 } else { 128 };
                if prefix > max {
                    return Err(format!("the prefix length must be 0 to {max}"));
                }
                Ok(Self {
                    network: cidr.masked(network),
                    prefix,
                })
            }
            other => other,
        }
    }

    /// `ip` with the bits past the prefix cleared.
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    /// The block's first address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4() && self.masked(ip) == self.network
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> Option<RefusedClass> {
        refused_class(text.parse().unwrap())
    }

    #[test]
    fn address_classes() {
        use RefusedClass::*;
        for (ip, want) in [
            ("10.0.0.1", None),
            ("192.0.2.7", None),
            ("fd00::1", None),
            ("2001:db8::1", None),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("127.0.0.1", Some(Loopback)),
            ("127.9.9.9", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("169.254.1.1", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("224.0.0.1", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("169.254.169.254", Some(Metadata)),
            ("fd00:ec2::254", Some(Metadata)),
            ("100.100.100.200", Some(Metadata)),
        ] {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("192.0.2.0/24").unwrap();
        assert!(c.contains("192.0.2.255".parse().unwrap()));
        assert!(!c.contains("192.0.3.1".parse().unwrap()));
        assert!(!c.contains("::ffff:192.0.2.1".parse().unwrap()));
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!c.contains("2001:db9::5".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert_eq!(
            Cidr::parse("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            Cidr::parse("192.0.2.7/24").unwrap_err(),
            "host bits are set: the block is 192.0.2.0/24"
        );
        assert_eq!(
            Cidr::parse("192.0.2.0/33").unwrap_err(),
            "the prefix length must be 0 to 32"
        );
        assert!(Cidr::parse("web/24").is_err());
    }
}
