//! Whether a client's SYN would reach its backend intact. Only such a SYN
//! may start a connect whose silence counts against the backend: a SYN with
//! TTL 1 or a bad checksum never gets there, and counting its
//! "retransmission" as a timeout would let anyone eject a healthy backend.
//!
//! A SYN is small (header, options, rarely data), so it is checked whole:
//! the TTL, the IPv4 header checksum and the TCP checksum over the
//! pseudo-header and the segment, summed here from scratch (the TTL is
//! checked by the caller, with `forward::ttl_allows_forwarding`).

use core::ffi::c_void;

use agent_common::{FAMILY_V4, reason};
use aya_ebpf::helpers::generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes};

use crate::{
    csum::{fold16 as fold, pseudo_header_sum},
    headers::TCP_CHECK_OFFSET,
    packet::{Ctx, Packet, fragment},
};

/// Longest TCP segment checked, in 32-bit words: a full 60-byte header and
/// 20 bytes of data. A longer SYN (TCP Fast Open data) is forwarded but not
/// checked, and its timeouts don't count.
pub const MAX_CHECKED_WORDS: usize = 20;

/// Room to copy into: a power of two, so that a mask can bound the copy's
/// length for the verifier.
pub const COPY_WORDS: usize = 32;

/// What checking a SYN found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Syn {
    /// IPv4 header and TCP checksums are right: it reaches the backend.
    Intact,
    /// Too long, odd-sized or fragmented: forwarded unchecked.
    Unchecked,
}

/// Checks the checksums of the client's SYN in `pkt` (the caller checks its
/// TTL), using `words` as room to copy headers into. `Err` is the reason
/// code of a SYN the backend would drop.
#[inline(always)]
pub fn check_syn(
    ctx: &Ctx,
    pkt: &Packet,
    src: &[u32; 4],
    dst: &[u32; 4],
    words: &mut [u32; COPY_WORDS],
) -> Result<Syn, u32> {
    if pkt.fragment != fragment::NONE {
        return Ok(Syn::Unchecked);
    }
    if pkt.family == FAMILY_V4 {
        // Its header is 5 to 15 words (`parse` refused fewer).
        let header = pkt.l4 - pkt.l3;
        if sum(ctx, pkt.l3, header, words) != Some(0xffff) {
            return Err(reason::BAD_CHECKSUM);
        }
    }
    // An odd length (data in the SYN) would need a byte-wise sum:
    // unchecked. (Lengths that contradict the frame are refused by
    // `parse::validate` before the result is used.)
    let Some(len) = pkt.ip_end.checked_sub(pkt.l4) else {
        return Ok(Syn::Unchecked);
    };
    if len & 1 != 0 {
        return Ok(Syn::Unchecked);
    }
    let Some(segment) = sum(ctx, pkt.l4, len, words) else {
        return Ok(Syn::Unchecked);
    };
    let pseudo = pseudo_header(pkt, src, dst, len);
    if fold(u64::from(pseudo) + u64::from(segment)) == 0xffff {
        return Ok(Syn::Intact);
    }
    // A SYN from a local socket on this host or across a veth may carry a
    // partial checksum (CHECKSUM_PARTIAL: the field holds the pseudo-header
    // sum, and the device or the receiving stack finishes it). Neither XDP
    // nor TC can see `ip_summed`, so the pattern itself is taken as right.
    let check = words[TCP_CHECK_OFFSET / 4].to_ne_bytes();
    if u16::from_ne_bytes([check[0], check[1]]) == pseudo {
        return Ok(Syn::Intact);
    }
    Err(reason::BAD_CHECKSUM)
}

/// The folded one's-complement sum of the `len` bytes at `offset` (an even
/// number, at most `MAX_CHECKED_WORDS` words), as read in place (see
/// `csum`); `None` if they are not all in the packet or too many. They are
/// copied out with the load-bytes helper: summed in place, LLVM merges the
/// words' bounds checks into one the verifier can't follow.
#[inline(always)]
fn sum(ctx: &Ctx, offset: usize, len: usize, words: &mut [u32; COPY_WORDS]) -> Option<u16> {
    if len == 0 || len > MAX_CHECKED_WORDS * 4 {
        return None;
    }
    let mut i = 0;
    while i < COPY_WORDS {
        // SAFETY: inside `words`; volatile, or the loop becomes a memset call.
        unsafe { core::ptr::write_volatile(&mut words[i], 0) };
        i += 1;
    }
    // The verifier wants the length's bounds on the register it gets: read
    // back through memory (LLVM can't drop the mask then), masked to the
    // room there is, and at least 1. It is `len` (1..=80) unchanged.
    // SAFETY: a read of a local.
    let n = (unsafe { core::ptr::read_volatile(&len) }.wrapping_sub(1) & (COPY_WORDS * 4 - 1)) + 1;
    let to = words.as_mut_ptr().cast::<c_void>();
    // SAFETY: `to` has room for `n` bytes; the helpers read the packet
    // themselves and fail if it is shorter.
    let rc = unsafe {
        if ctx.skb {
            bpf_skb_load_bytes(ctx.raw, offset as u32, to, n as u32)
        } else {
            bpf_xdp_load_bytes(ctx.raw.cast(), offset as u32, to, n as u32)
        }
    };
    if rc != 0 {
        return None;
    }
    let mut total = 0u64;
    let mut i = 0;
    while i < COPY_WORDS {
        total += u64::from(words[i]);
        i += 1;
    }
    Some(fold(total))
}

/// The pseudo-header's folded sum, words as they would sit in the packet.
#[inline(always)]
fn pseudo_header(pkt: &Packet, src: &[u32; 4], dst: &[u32; 4], len: usize) -> u16 {
    fold(pseudo_header_sum(
        pkt.family == FAMILY_V4,
        pkt.proto,
        src,
        dst,
        len,
    ))
}
