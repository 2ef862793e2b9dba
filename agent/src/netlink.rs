//! Route, neighbour, address and link changes from the kernel (rtnetlink
//! multicast groups): each one refreshes the datapath's FIB caches and the
//! interfaces that globs and `auto` name, at once rather than on a timer.

use std::{io, sync::Arc};

use tokio::sync::Notify;
use tracing::warn;

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

/// Starts a thread that listens to rtnetlink in this network namespace and
/// wakes the returned `Notify` after each batch of messages. A lost batch
/// (the socket's buffer overran) wakes it too: something changed.
pub fn watch() -> io::Result<Arc<Notify>> {
    // SAFETY: plain socket(); the fd is owned by the thread below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_nl is plain data; zeroed is valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = RTMGRP_LINK
        | RTMGRP_NEIGH
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV6_ROUTE;
    // SAFETY: binding the fd above to an address of the size given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
        return Err(err);
    }
    let notify = Arc::new(Notify::new());
    let wake = notify.clone();
    std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // SAFETY: reading into a buffer we own, of the length given.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let err = io::Error::last_os_error();
                    match err.raw_os_error() {
                        Some(libc::ENOBUFS) | Some(libc::EINTR) => {}
                        _ => {
                            warn!(error = %err, "rtnetlink watch ended; route changes are no longer followed at once");
                            return;
                        }
                    }
                }
                wake.notify_one();
            }
        })?;
    Ok(notify)
}
