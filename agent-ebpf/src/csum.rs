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
