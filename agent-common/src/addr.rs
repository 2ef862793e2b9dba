//! Addresses as the kernel keeps them in keys and values: four words in
//! network byte order, IPv4 in word 0. Shared by the agent and the tests.

use core::net::IpAddr;

use crate::{FAMILY_V4, FAMILY_V6};

/// The words of `ip`.
pub fn words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The inverse of `words`, for an address of the family `v4` says.
pub fn words_ip(words: [u32; 4], v4: bool) -> IpAddr {
    if v4 {
        return IpAddr::from(words[0].to_ne_bytes());
    }
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    IpAddr::from(o)
}

/// `FAMILY_V4` or `FAMILY_V6`.
pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn words_round_trip_in_network_order() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let w = words(v4);
        assert_eq!(w[0].to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(&w[1..], &[0, 0, 0]);
        assert_eq!(words_ip(w, true), v4);
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x2));
        assert_eq!(words_ip(words(v6), false), v6);
        assert_eq!(words(v6)[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!((family(v4), family(v6)), (FAMILY_V4, FAMILY_V6));
    }
}
