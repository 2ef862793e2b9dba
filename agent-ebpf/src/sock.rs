//! Socket-level load balancing for clients on this node (pods and host
//! processes in the attached cgroup): the connect/sendmsg hooks rewrite a
//! VIP destination to a backend before any packet exists, with the same
//! service map, Maglev tables and ejection state as the packet path;
//! getpeername/recvmsg show the application the VIP again. TCP connects are
//! followed through the socket state tracepoint, which feeds the same
//! failure counting and ejection.

use agent_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, NO_BACKEND, PROTO_TCP, PROTO_UDP, ServiceKey, SockConnect,
    SockReverse, SockReverseKey,
};
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::bpf_get_socket_cookie,
    programs::{RawTracePointContext, SockAddrContext},
};

use crate::{
    health::{self, Failure},
    maps::{BACKENDS, SERVICES, SOCK_CONNECTS, SOCK_REVERSE},
};

/// A cgroup sock_addr program's verdict: let the call proceed.
const ALLOW: i32 = 1;
const TCP_ESTABLISHED: u64 = 1;
const TCP_SYN_SENT: u64 = 2;
const TCP_CLOSE: u64 = 7;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// connect(): TCP connects are followed for failures.
    Connect,
    /// sendmsg() on an unconnected UDP socket.
    Sendmsg,
}

/// The destination in a sock_addr context: address words (network order),
/// port (network order).
#[inline(always)]
fn destination(sa: *mut bpf_sock_addr, v6: bool) -> ([u32; 4], u16) {
    // SAFETY: `sa` is the context the kernel passed; these fields are
    // readable in the connect, sendmsg, recvmsg and getpeername hooks.
    unsafe {
        let addr = if v6 {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        } else {
            [(*sa).user_ip4, 0, 0, 0]
        };
        (addr, (*sa).user_port as u16)
    }
}

#[inline(always)]
fn set_destination(sa: *mut bpf_sock_addr, v6: bool, addr: &[u32; 4], port: u16) {
    // SAFETY: as above; these fields are writable in these hooks.
    unsafe {
        if v6 {
            (*sa).user_ip6[0] = addr[0];
            (*sa).user_ip6[1] = addr[1];
            (*sa).user_ip6[2] = addr[2];
            (*sa).user_ip6[3] = addr[3];
        } else {
            (*sa).user_ip4 = addr[0];
        }
        (*sa).user_port = u32::from(port);
    }
}

/// connect4/6, sendmsg4/6: a VIP destination becomes a backend.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, v6: bool, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's context.
    let proto = unsafe { (*sa).protocol } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let (vip, vport) = destination(sa, v6);
    let family = if v6 { FAMILY_V6 } else { FAMILY_V4 };
    let key = ServiceKey {
        addr: vip,
        port: vport,
        proto,
        family,
    };
    // SAFETY: a hash map lookup; the value is only read.
    let Some(service) = (unsafe { SERVICES.get(key) }) else {
        return ALLOW;
    };
    // SAFETY: a helper the sock_addr hooks may call with their context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // The same socket always gets the same backend (a UDP socket's
    // datagrams stay together); different sockets spread like flows do.
    let h = agent_common::hash::rehash(cookie as u32 ^ (cookie >> 32) as u32, 1);
    let Some((backend_id, _)) = health::pick(service, h, NO_BACKEND, 0) else {
        return ALLOW; // no backend: the connect goes to the VIP and fails there
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return ALLOW;
    };
    set_destination(sa, v6, &backend.addr, backend.port);
    let reverse_key = SockReverseKey {
        cookie,
        backend: backend.addr,
        port: backend.port,
        _pad: [0; 3],
    };
    let reverse = SockReverse {
        vip,
        port: vport,
        _pad: 0,
        service_id: service.id,
    };
    // BPF_NOEXIST: a UDP socket's later datagrams don't count again.
    let new = SOCK_REVERSE.insert(reverse_key, reverse, 1).is_ok();
    if new || hook == Hook::Connect {
        health::count_connection(service.id, backend_id);
    }
    if hook == Hook::Connect && proto == PROTO_TCP {
        // SAFETY: reading the socket pointer of the context; only its value
        // is used (the key the state tracepoint sees).
        let sk = unsafe { (*sa).__bindgen_anon_1.sk } as u64;
        let connect = SockConnect {
            vip,
            vport,
            family,
            established: 0,
            service_id: service.id,
            backend_id,
            _pad: 0,
            since_ns: health::now_ns(),
        };
        let _ = SOCK_CONNECTS.insert(sk, connect, 0);
    }
    ALLOW
}

/// getpeername4/6, recvmsg4/6: a backend address the balancer chose for
/// this socket is shown as the VIP.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let (addr, port) = destination(sa, v6);
    // SAFETY: as in `translate`.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let key = SockReverseKey {
        cookie,
        backend: addr,
        port,
        _pad: [0; 3],
    };
    // SAFETY: a hash map lookup; the value is only read.
    if let Some(r) = unsafe { SOCK_REVERSE.get(key) } {
        set_destination(sa, v6, &r.vip, r.port);
    }
    ALLOW
}

/// sock:inet_sock_set_state (raw): a followed connect that reaches
/// ESTABLISHED is a success (latency); one that closes from SYN_SENT is a
/// refusal (or, after the service's connect timeout, a timeout); an
/// established one that closes ends its active count.
#[inline(always)]
pub fn state_change(ctx: &RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    let Some(c) = SOCK_CONNECTS.get_ptr_mut(sk) else {
        return 0;
    };
    // SAFETY: a live LRU value; only this socket's state changes touch it.
    let c = unsafe { &mut *c };
    let key = FlowKey {
        src: [0; 4],
        dst: c.vip,
        sport: 0,
        dport: c.vport,
        proto: PROTO_TCP,
        family: c.family,
        _pad: 0,
    };
    let now = health::now_ns();
    if new == TCP_ESTABLISHED && c.established == 0 {
        c.established = 1;
        health::record_success(&key, c.service_id, c.backend_id, now - c.since_ns, now);
    } else if new == TCP_CLOSE {
        if old == TCP_SYN_SENT {
            let timeout = health::policy(c.service_id).map_or(u64::MAX, |p| p.connect_timeout_ns);
            let failure = if now - c.since_ns < timeout {
                Failure::Refused
            } else {
                Failure::Timeout
            };
            health::record_failure(&key, c.service_id, c.backend_id, failure, now);
        } else if c.established != 0 {
            health::count_close(&key, c.service_id, c.backend_id, c.since_ns);
        }
        let _ = SOCK_CONNECTS.remove(sk);
    }
    0
}
