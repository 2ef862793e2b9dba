//! Incremental Internet checksum updates (RFC 1624).
//!
//! All values are taken as they sit in the packet (network byte order read as
//! native integers): one's-complement sums don't depend on byte order as long as
//! the checksum is read and written the same way.

/// Running difference between old and new header words.
#[derive(Clone, Copy, Default)]
pub struct Diff(u64);

impl Diff {
    #[inline(always)]
    pub fn word32(self, old: u32, new: u32) -> Self {
        Self(self.0 + u64::from(!old) + u64::from(new))
    }

    #[inline(always)]
    pub fn addr(self, old: &[u32; 4], new: &[u32; 4]) -> Self {
        self.word32(old[0], new[0])
            .word32(old[1], new[1])
            .word32(old[2], new[2])
            .word32(old[3], new[3])
    }

    #[inline(always)]
    pub fn word16(self, old: u16, new: u16) -> Self {
        Self(self.0 + u64::from(!old) + u64::from(new))
    }

    /// The difference as a 32-bit one's-complement sum, the `__wsum` that
    /// `bpf_l4_csum_replace` adds when given no old value.
    #[inline(always)]
    pub fn wsum(self) -> u32 {
        let sum = (self.0 & 0xffff_ffff) + (self.0 >> 32);
        ((sum & 0xffff_ffff) + (sum >> 32)) as u32
    }

    /// The checksum after the changes, given the one before.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let mut sum = u64::from(!check) + self.0;
        sum = (sum & 0xffff_ffff) + (sum >> 32);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

/// The sum of an L4 segment's pseudo-header (addresses, protocol, length
/// `len`), words as they sit in the packet, not yet folded.
#[inline(always)]
pub fn pseudo_header_sum(v4: bool, proto: u8, src: &[u32; 4], dst: &[u32; 4], len: usize) -> u64 {
    if v4 {
        u64::from(src[0])
            + u64::from(dst[0])
            + u64::from(u16::from(proto).to_be())
            + u64::from((len as u16).to_be())
    } else {
        let mut sum = u64::from((len as u32).to_be()) + u64::from(u32::from(proto).to_be());
        let mut i = 0;
        while i < 4 {
            sum += u64::from(src[i]) + u64::from(dst[i]);
            i += 1;
        }
        sum
    }
}

/// Folds a sum of 32-bit words into 32 bits (one's complement).
#[inline(always)]
pub fn fold32(mut sum: u64) -> u32 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}

/// Folds a sum of 16- and 32-bit words into 16 bits (one's complement).
#[inline(always)]
pub fn fold16(sum: u64) -> u16 {
    let mut sum = u64::from(fold32(sum));
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
