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

mod failure;

mod budget;

mod tcp_state;

mod icmp;

mod nat;

mod forward;

mod pipeline;

mod bench;
mod sock;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_redirect,
    macros::{cgroup_sock, cgroup_sock_addr, classifier, raw_tracepoint, xdp},
    programs::{RawTracePointContext, SockAddrContext, SockContext, TcContext, XdpContext},
};
use packet::{Action, Ctx};
use sock::Hook;

/// Longest header stack the pipeline reads: Ethernet + IPv6 + TCP (with room).
const TC_HEADER_BYTES: u32 = 14 + 40 + 60;

#[xdp]
pub fn sluice_xdp(ctx: XdpContext) -> u32 {
    let c = Ctx {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.data_end() - ctx.data(),
        ifindex: ctx.ingress_ifindex() as u32,
        raw: ctx.ctx.cast(),
        skb: false,
    };
    match pipeline::process(&c) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Tx => xdp_action::XDP_TX,
        // SAFETY: plain helper call; it returns XDP_REDIRECT or XDP_ABORTED.
        Action::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
    }
}

#[classifier]
pub fn sluice_tc(ctx: TcContext) -> i32 {
    // Headers may sit in paged data on an skb: pull them into the linear part
    // so direct packet access can see them.
    if ctx.data() + TC_HEADER_BYTES as usize > ctx.data_end() {
        let _ = ctx.pull_data(ctx.len().min(TC_HEADER_BYTES));
    }
    // SAFETY: the skb pointer the kernel passed in.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let c = Ctx {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.len() as usize,
        ifindex,
        raw: ctx.skb.skb.cast(),
        skb: true,
    };
    match pipeline::process(&c) {
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
