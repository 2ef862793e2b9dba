//! Programs for `cargo xtask bench datapath` only; the agent never attaches
//! them. BPF_PROG_TEST_RUN with `repeat` runs a program again on its own
//! output, so a NAT program would time its rewritten packet from the second
//! run on. `bench_restore` writes the original headers back before each run
//! and tail-calls the program under test; the bench subtracts its cost by
//! timing it in front of `bench_pass` too.

use agent_common::BenchFrame;
use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, ProgramArray},
    programs::XdpContext,
};

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
        // SAFETY: a map value; both packet writes lie in the first 64 bytes.
        // IPv4 frames: 28..30 is the low half of the source address, 34..36
        // the source port; together 2^32 distinct flows.
        unsafe {
            *counter = (*counter).wrapping_add(1);
            ((data + 34) as *mut u16).write_unaligned(*counter as u16);
            ((data + 28) as *mut u16).write_unaligned((*counter >> 16) as u16);
        }
    }
    // SAFETY: a tail call replaces this program; on failure it returns.
    unsafe { BENCH_JUMP.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}
