//! Sluice's kernel programs: the same load-balancing pipeline behind an XDP
//! entry point and a TC (tcx) entry point for interfaces where XDP can't run.
#![no_std]
// atomic_xadd: the BPF target has no atomic read-modify-write in core::sync.
#![allow(internal_features)]
#![feature(core_intrinsics)]
#![no_main]

// The modules in layers, each using only those above it: what every stage
// builds on, the pipeline's stages in the packet's order, the pipeline that
// calls them, and beside it socket-level balancing and the benchmark's
// programs. (One module a group: rustfmt would sort a group by name.)
mod csum;
mod headers;

mod packet;

mod maps;

mod events;
mod stats;

mod parse;

mod integrity;

mod service;

mod conntrack;

mod select;

mod affinity;

mod least_conn;

mod failure;

mod budget;

mod tcp_state;

mod icmp;

mod nat;

mod forward;

mod resyn;

mod pipeline;

mod bench;
mod sock;

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT, xdp_action, xdp_md},
    helpers::bpf_redirect,
    macros::{cgroup_sock, cgroup_sock_addr, classifier, raw_tracepoint, xdp},
    programs::{RawTracePointContext, SockAddrContext, SockContext, TcContext, XdpContext},
};
use maps::{RESYN_TC, RESYN_XDP};
use packet::{Action, Ctx};
use sock::Hook;

/// Longest header stack the pipeline reads: Ethernet + IPv6 + TCP (with room).
const TC_HEADER_BYTES: u32 = 14 + 40 + 60;

#[xdp]
pub fn sluice_xdp(ctx: XdpContext) -> u32 {
    let verdict = xdp_pipeline(ctx.ctx);
    if verdict == xdp_action::XDP_DROP && resyn::requested() {
        // A refusal held back for a retry: `resyn` may send the client's
        // SYN on at once. If the slot is empty, the drop stands.
        // SAFETY: a tail call with this program's own context.
        unsafe { RESYN_XDP.tail_call(&ctx, 0) };
    }
    verdict
}

/// The pipeline behind `sluice_xdp`, out of line: the kernel allows a tail
/// call only in a program's main function (without BTF for its
/// subprograms), and the pipeline is too big for LLVM to inline there.
#[inline(never)]
fn xdp_pipeline(raw: *mut xdp_md) -> u32 {
    xdp_verdict(pipeline::process(&xdp_ctx(&XdpContext::new(raw))))
}

#[classifier]
pub fn sluice_tc(ctx: TcContext) -> i32 {
    let verdict = tc_pipeline(ctx.skb.skb);
    if verdict == TC_ACT_SHOT && resyn::requested() {
        // As in `sluice_xdp`.
        // SAFETY: a tail call with this program's own context.
        unsafe { RESYN_TC.tail_call(&ctx, 0) };
    }
    verdict
}

/// The pipeline behind `sluice_tc`, out of line (see `xdp_pipeline`).
#[inline(never)]
fn tc_pipeline(raw: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(raw);
    // Headers may sit in paged data on an skb: pull them into the linear part
    // so direct packet access can see them.
    if ctx.data() + TC_HEADER_BYTES as usize > ctx.data_end() {
        let _ = ctx.pull_data(ctx.len().min(TC_HEADER_BYTES));
    }
    let c = tc_ctx(&ctx);
    tc_verdict(pipeline::process(&c), c.ifindex)
}

/// A refusal turned into the client's SYN towards the next backend (see
/// `resyn`), tail-called by `sluice_xdp`.
#[xdp]
pub fn sluice_resyn_xdp(ctx: XdpContext) -> u32 {
    xdp_verdict(resyn::run(&xdp_ctx(&ctx)))
}

/// As `sluice_resyn_xdp`, tail-called by `sluice_tc`.
#[classifier]
pub fn sluice_resyn_tc(ctx: TcContext) -> i32 {
    let c = tc_ctx(&ctx);
    tc_verdict(resyn::run(&c), c.ifindex)
}

#[inline(always)]
fn xdp_ctx(ctx: &XdpContext) -> Ctx {
    Ctx {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.data_end() - ctx.data(),
        ifindex: ctx.ingress_ifindex() as u32,
        raw: ctx.ctx.cast(),
        skb: false,
    }
}

#[inline(always)]
fn tc_ctx(ctx: &TcContext) -> Ctx {
    // SAFETY: the skb pointer the kernel passed in.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ctx {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.len() as usize,
        ifindex,
        raw: ctx.skb.skb.cast(),
        skb: true,
    }
}

#[inline(always)]
fn xdp_verdict(action: Action) -> u32 {
    match action {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Tx => xdp_action::XDP_TX,
        // SAFETY: plain helper call; it returns XDP_REDIRECT or XDP_ABORTED.
        Action::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
    }
}

/// `ifindex`: the interface the packet arrived on.
#[inline(always)]
fn tc_verdict(action: Action, ifindex: u32) -> i32 {
    match action {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
        // SAFETY: plain helper call; it returns TC_ACT_REDIRECT or TC_ACT_SHOT.
        Action::Tx => unsafe { bpf_redirect(ifindex, 0) as i32 },
        // SAFETY: as above.
        Action::Redirect(target) => unsafe { bpf_redirect(target, 0) as i32 },
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

// Socket-level balancing (see `sock`): one entry point per hook and family.

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, false, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, true, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, false, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sluice_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, true, Hook::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sluice_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sluice_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sluice_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, true)
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn sluice_sock_state(ctx: RawTracePointContext) -> i32 {
    sock::state_change(&ctx)
}

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn sluice_tcp_reset(ctx: RawTracePointContext) -> i32 {
    sock::reset(&ctx)
}

#[cgroup_sock(sock_release)]
pub fn sluice_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}
