//! Inputs for the unit tests: a fixed pseudo-random generator (SplitMix64, so
//! every run sees the same values and no `rand` dependency is needed) and
//! 5-tuples laid out as the kernel reads them (network byte order).

use crate::{FlowKey, PROTO_TCP, PROTO_UDP};

pub struct Gen(u64);

impl Gen {
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn u32(&mut self) -> u32 {
        (self.u64() >> 32) as u32
    }

    pub fn u16(&mut self) -> u16 {
        (self.u64() >> 48) as u16
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: u32) -> bool {
        self.u32().is_multiple_of(n)
    }

    /// A random IPv4 address (as `[u32; 4]`) or, one time in four, IPv6.
    pub fn addr(&mut self) -> [u32; 4] {
        if self.one_in(4) {
            [self.u32(), self.u32(), self.u32(), self.u32()]
        } else {
            [self.u32(), 0, 0, 0]
        }
    }

    /// A random 5-tuple: any addresses, any ports, TCP or UDP.
    pub fn tuple(&mut self) -> FlowKey {
        FlowKey {
            src: self.addr(),
            dst: self.addr(),
            sport: self.u16(),
            dport: self.u16(),
            proto: if self.one_in(2) { PROTO_TCP } else { PROTO_UDP },
            ..FlowKey::default()
        }
    }
}

/// An IPv4 address as the packet carries it.
pub const fn v4(a: u8, b: u8, c: u8, d: u8) -> [u32; 4] {
    [u32::from_ne_bytes([a, b, c, d]), 0, 0, 0]
}

/// The `i`-th address of 10.0.0.0/8, counting up as an operator would.
pub const fn v4_nth(i: u32) -> [u32; 4] {
    let [_, b, c, d] = i.to_be_bytes();
    v4(10, b, c, d)
}
