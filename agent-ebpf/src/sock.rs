//! Socket-level load balancing for clients on this node (pods and host
//! processes in the attached cgroup): the connect/sendmsg hooks rewrite a
//! VIP destination to a backend before any packet exists, with the same
//! service map, Maglev tables and ejection state as the packet path;
//! getpeername/recvmsg show the application the VIP again. TCP connects are
//! followed through the socket state tracepoint, which feeds the same
//! failure counting and ejection.

use agent_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, NO_BACKEND, PROTO_TCP, PROTO_UDP, SERVICE_F_SOURCE_RANGES,
    ServiceKey, SockConnect, SockReverse, SourceRange, reason,
};
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{RawTracePointContext, SockAddrContext, SockContext},
};

use crate::{
    failure::{self, Failure},
    maps::{BACKENDS, SERVICES, SOCK_CONNECTS, SOCK_REVERSE},
    select, service,
    stats::count,
};

/// A cgroup sock_addr program's verdict: let the call proceed.
const ALLOW: i32 = 1;
/// ... or fail it with EPERM.
const DENY: i32 = 0;
const TCP_ESTABLISHED: u64 = 1;
const TCP_SYN_SENT: u64 = 2;
const TCP_CLOSE: u64 = 7;
/// A followed connect older than this that hasn't reached ESTABLISHED is
/// stale (its socket never sent a SYN, and the address may be reused by
/// another socket): not acted on. The kernel gives up a SYN after ~127 s.
const CONNECT_STALE_NS: u64 = 150_000_000_000;

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

/// The address the socket is bound to, if it is bound to one (not the
/// wildcard): the source its packets will carry. An unbound socket's
/// source is chosen by the route later, after these hooks.
#[inline(always)]
fn bound_source(sa: *mut bpf_sock_addr, v6: bool) -> Option<[u32; 4]> {
    // SAFETY: `sk` of a sock_addr context is the socket (never null in
    // these hooks); its source address fields are readable.
    let addr = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        if v6 {
            [
                (*sk).src_ip6[0],
                (*sk).src_ip6[1],
                (*sk).src_ip6[2],
                (*sk).src_ip6[3],
            ]
        } else {
            [(*sk).src_ip4, 0, 0, 0]
        }
    };
    (addr != [0; 4]).then_some(addr)
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
    // `allowed_sources`, where the source is known here: a socket bound to
    // an address outside the ranges is refused (EPERM, counted as
    // `source_denied`). An unbound socket's source is not known yet: it is
    // left untranslated, so its packets go to the VIP and are checked by
    // the packet path where they cross an attached interface (never
    // balanced unchecked).
    if service.flags & SERVICE_F_SOURCE_RANGES != 0 {
        let Some(src) = bound_source(sa, v6) else {
            return ALLOW;
        };
        let mut range_key = aya_ebpf::maps::lpm_trie::Key::new(0, SourceRange::default());
        if !service::source_allowed(&mut range_key, service.id, &src, family) {
            count(reason::SOURCE_DENIED);
            return DENY;
        }
    }
    // SAFETY: a helper the sock_addr hooks may call with their context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // The same socket always gets the same backend (a UDP socket's
    // datagrams stay together); different sockets spread like flows do.
    let h = agent_common::hash::rehash(cookie as u32 ^ (cookie >> 32) as u32, 1);
    let Some((backend_id, _)) = select::pick(service, h, NO_BACKEND, 0) else {
        return ALLOW; // no backend: the connect goes to the VIP and fails there
    };
    let Some(backend) = BACKENDS.get(backend_id) else {
        return ALLOW;
    };
    set_destination(sa, v6, &backend.addr, backend.port);
    let reverse = SockReverse {
        vip,
        backend: backend.addr,
        vport,
        backend_port: backend.port,
        service_id: service.id,
    };
    // The same VIP again from a UDP socket doesn't count again.
    // SAFETY: a hash map lookup; the value is only read.
    let new = unsafe { SOCK_REVERSE.get(cookie) }.is_none_or(|r| r.vip != vip || r.vport != vport);
    let _ = SOCK_REVERSE.insert(cookie, reverse, 0);
    if new || hook == Hook::Connect {
        failure::count_connection(service.id, backend_id);
    }
    if hook == Hook::Connect && proto == PROTO_TCP {
        // SAFETY: reading the socket pointer of the context; only its value
        // is used (the key the state tracepoint sees).
        let sk = unsafe { (*sa).__bindgen_anon_1.sk } as u64;
        // SAFETY: a helper the sock_addr hooks may call with their context.
        let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
        let connect = SockConnect {
            vip,
            vport,
            family,
            established: 0,
            service_id: service.id,
            backend_id,
            reset: 0,
            since_ns: failure::now_ns(),
            client: netns as u32 ^ (netns >> 32) as u32,
            _pad: 0,
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
    // SAFETY: a hash map lookup; the value is only read.
    if let Some(r) = unsafe { SOCK_REVERSE.get(cookie) }
        && r.backend == addr
        && r.backend_port == port
    {
        set_destination(sa, v6, &r.vip, r.vport);
    }
    ALLOW
}

/// sock_release: the socket is gone; so are its entries.
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    // SAFETY: a helper the cgroup sock hooks may call with their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let _ = SOCK_REVERSE.remove(cookie);
    // The context is the socket: its address is the followed connect's key.
    let _ = SOCK_CONNECTS.remove(ctx.sock as u64);
    1
}

/// tcp:tcp_receive_reset (raw): a followed connect got a reset: when it
/// then closes from SYN_SENT, the backend refused it.
#[inline(always)]
pub fn reset(ctx: &RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if let Some(c) = SOCK_CONNECTS.get_ptr_mut(sk) {
        // SAFETY: a live LRU value.
        unsafe { (*c).reset = 1 };
    }
    0
}

/// sock:inet_sock_set_state (raw): a followed connect that goes from
/// SYN_SENT to ESTABLISHED is a success (latency); one that closes from
/// SYN_SENT after a reset is a refusal, after the service's connect timeout
/// a timeout, and otherwise (the application gave up early, a local error)
/// no failure of the backend's; an established one that closes ends its
/// active count.
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
    // The connecting pod (network namespace) stands for the client address.
    let key = FlowKey {
        src: [c.client, 0, 0, 0],
        dst: c.vip,
        sport: 0,
        dport: c.vport,
        proto: PROTO_TCP,
        family: c.family,
        _pad: 0,
    };
    let now = failure::now_ns();
    let age = now.wrapping_sub(c.since_ns);
    if c.established == 0 && age > CONNECT_STALE_NS {
        let _ = SOCK_CONNECTS.remove(sk);
        return 0;
    }
    if old == TCP_SYN_SENT && new == TCP_ESTABLISHED && c.established == 0 {
        c.established = 1;
        failure::record_success(&key, c.service_id, c.backend_id, age, now);
    } else if new == TCP_CLOSE {
        if old == TCP_SYN_SENT && c.established == 0 {
            let timeout = failure::policy(c.service_id).map_or(u64::MAX, |p| p.connect_timeout_ns);
            let failure = if c.reset != 0 {
                Some(Failure::Refused)
            } else if age >= timeout {
                Some(Failure::Timeout)
            } else {
                None
            };
            if let Some(failure) = failure {
                failure::record_failure(&key, c.service_id, c.backend_id, failure, now);
            }
        } else if c.established != 0 {
            failure::count_close(&key, c.service_id, c.backend_id, c.since_ns);
        }
        let _ = SOCK_CONNECTS.remove(sk);
    }
    0
}
