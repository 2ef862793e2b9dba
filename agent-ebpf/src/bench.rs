//! Programs for `cargo xtask bench datapath` only; the agent never attaches
//! them. BPF_PROG_TEST_RUN with `repeat` runs a program again on its own
//! output, so a NAT program would time its rewritten packet from the second
//! run on. `bench_restore` writes the original headers back before each run
//! and tail-calls the program under test; the bench subtracts its cost by
//! timing it in front of `bench_pass` too. `bench_redirect` and
//! `bench_drop` serve the live-frames row (frames really sent on a veth).

use agent_common::BenchFrame;
use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

use crate::csum::Diff;

/// The headers to restore (slot 0).
#[map]
pub static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);

/// Slot 0: the program under test.
#[map]
pub static BENCH_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Run counter, written into the frame to make every run a new flow. Shared
/// by all CPUs (not per-CPU): a run on another CPU must not repeat old flows;
/// the benchmark runs one test at a time.
#[map]
pub static BENCH_COUNTER: Array<u32> = Array::with_max_entries(1, 0);

/// The empty program: the baseline every cost is measured against.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_restore(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    const LEN: usize = core::mem::size_of::<[u64; 8]>();
    if data + LEN > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(frame) = BENCH_FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let words = data as *mut u64;
    for (i, word) in frame.words.iter().enumerate() {
        // SAFETY: the first 64 bytes are inside the packet (checked above).
        // Volatile, word by word: a plain copy becomes a memmove call, which
        // the verifier refuses between packet and map memory.
        unsafe { words.add(i).write_volatile(*word) };
    }
    if frame.vary != 0 {
        let Some(counter) = BENCH_COUNTER.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: a map value; every packet access lies in the first 64
        // bytes. IPv4 frames: 28..30 is the low half of the source address,
        // 34..36 the source port (together 2^32 distinct flows); the IPv4
        // header checksum (24..26) and the TCP checksum (50..52) are fixed
        // for them, as the datapath checks a SYN whole.
        unsafe {
            *counter = (*counter).wrapping_add(1);
            let (port_at, addr_at) = ((data + 34) as *mut u16, (data + 28) as *mut u16);
            let (old_port, old_addr) = (port_at.read_unaligned(), addr_at.read_unaligned());
            let (new_port, new_addr) = (*counter as u16, (*counter >> 16) as u16);
            port_at.write_unaligned(new_port);
            addr_at.write_unaligned(new_addr);
            let addr = Diff::default().word16(old_addr, new_addr);
            let ip_check = (data + 24) as *mut u16;
            ip_check.write_unaligned(addr.apply(ip_check.read_unaligned()));
            let tcp_check = (data + 50) as *mut u16;
            tcp_check.write_unaligned(
                addr.word16(old_port, new_port)
                    .apply(tcp_check.read_unaligned()),
            );
        }
    }
    // SAFETY: a tail call replaces this program; on failure it returns.
    unsafe { BENCH_JUMP.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Slot 0: the interface `bench_redirect` sends every frame to.
#[map]
pub static BENCH_TARGET: Array<u32> = Array::with_max_entries(1, 0);

/// Slot 0: frames `bench_drop` received, per CPU.
#[map]
pub static BENCH_DELIVERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The forwarding ceiling for live frames: a program that only redirects,
/// by the same helper as the datapath, to the interface in `BENCH_TARGET`.
#[xdp]
pub fn bench_redirect(_ctx: XdpContext) -> u32 {
    match BENCH_TARGET.get(0) {
        // SAFETY: plain helper call.
        Some(&ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
        None => xdp_action::XDP_ABORTED,
    }
}

/// Attached to the peer of the interface live frames are redirected to: a
/// veth drops frames sent into it unless its peer runs an XDP program. It
/// counts them (proof they left by that interface) and drops them, so that
/// the receiving side costs as little as it can and the same for every case.
#[xdp]
pub fn bench_drop(ctx: XdpContext) -> u32 {
    // Only the benchmark's frames (IPv4 TCP) count: the kernel sends its
    // own on t0 now and then (IPv6 neighbour discovery, MLD).
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 24 > end {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: bytes 12..14 (EtherType) and 23 (IPv4 protocol) are inside
    // the frame (checked above).
    let ours = unsafe {
        ((data + 12) as *const u16).read_unaligned() == 0x0800u16.to_be()
            && *((data + 23) as *const u8) == 6
    };
    if ours && let Some(count) = BENCH_DELIVERED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU map.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}
