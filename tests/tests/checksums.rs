//! Checksums of the packets Sluice rewrites, read where they arrive.
//!
//! On veth, a local sender's packets carry a partial checksum (only the
//! pseudo-header sum, `CHECKSUM_PARTIAL`) that the receiving stack trusts
//! without looking: a wrong one would pass every other test here and be
//! sent wrong on a real NIC. So the client's and the backend's interfaces are
//! captured with `PACKET_AUXDATA`, which says which packets are partial:
//! a partial one must hold the pseudo-header sum of its new addresses, a
//! complete one must verify.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::mpsc::Receiver,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use sluice_tests::{Agent, StopOnDrop, TempDir, packet::checksum};
use testbed::{Family, Netns, Topology, tcp_ask};

const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
const PACKET_AUXDATA: libc::c_int = 8;
/// Connections per run. Each brings at least 3 TCP packets to either side
/// (one of the handshake, the request or answer, one of the close), usually
/// 4 or 5: the check that the capture saw the traffic counts on 3.
const CONNECTIONS: usize = 40;

#[derive(Debug, Default)]
struct Seen {
    partial: usize,
    complete: usize,
    bad: Vec<String>,
}

/// The TCP pseudo-header of a segment of `len` bytes between `addrs` (the
/// source and destination addresses, as they are in the IP header).
fn pseudo_header(addrs: &[u8], len: usize) -> Vec<u8> {
    let mut p = addrs.to_vec();
    p.extend_from_slice(&[0, 6]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// Checks the TCP checksum of an Ethernet frame; None if it isn't TCP.
fn check(frame: &[u8], partial: bool) -> Option<Result<(), String>> {
    let ether_type = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (pseudo, l4) = match ether_type {
        0x0800 if ip.get(9) == Some(&6) => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let l4 = ip.get(ihl..total)?;
            (pseudo_header(&ip[12..20], l4.len()), l4)
        }
        0x86dd if ip.get(6) == Some(&6) => {
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let l4 = ip.get(40..40 + payload)?;
            (pseudo_header(&ip[8..40], l4.len()), l4)
        }
        _ => return None,
    };
    let field = u16::from_be_bytes([*l4.get(16)?, *l4.get(17)?]);
    let ok = if partial {
        // The field holds the folded pseudo-header sum (the complement of
        // its checksum); the device (or the stack) adds the segment's own
        // sum and complements.
        let want = !checksum(&pseudo);
        field == want || (want == 0xffff && field == 0) || (want == 0 && field == 0xffff)
    } else {
        // The pseudo-header has an even length: the segment's words stay
        // aligned after it.
        checksum(&[pseudo.as_slice(), l4].concat()) == 0
    };
    Some(if ok {
        Ok(())
    } else {
        Err(format!(
            "{} TCP checksum {field:#06x} wrong in {:02x?}",
            if partial { "partial" } else { "complete" },
            &frame[..frame.len().min(80)]
        ))
    })
}

/// Captures the TCP packets arriving on `eth0` of `ns` until `stop`; the
/// result comes on the returned channel.
fn capture(ns: &Netns, stop: Arc<AtomicBool>) -> Result<Receiver<Result<Seen>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let result = (|| -> Result<Seen> {
            // SAFETY: plain socket(); owned right away.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                )
            };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: a fresh fd we own from here.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = c"eth0";
            // SAFETY: if_nametoindex reads the NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            let one: libc::c_int = 1;
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: bind and setsockopt with values of the sizes given.
            unsafe {
                if libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                ) != 0
                {
                    bail!("bind: {}", std::io::Error::last_os_error());
                }
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    PACKET_AUXDATA,
                    (&raw const one).cast(),
                    size_of::<libc::c_int>() as u32,
                );
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as u32,
                );
            }
            tx.send(()).ok();
            let mut seen = Seen::default();
            let mut frame = vec![0u8; 70_000];
            let mut control = [0u64; 16];
            while !stop.load(Ordering::SeqCst) {
                // SAFETY: plain data.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut iov = libc::iovec {
                    iov_base: frame.as_mut_ptr().cast(),
                    iov_len: frame.len(),
                };
                // SAFETY: plain data.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_name = (&raw mut from).cast();
                msg.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
                msg.msg_iov = &raw mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = size_of_val(&control);
                // SAFETY: every buffer msg points to is ours and alive.
                let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, 0) };
                if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let mut status = 0;
                // SAFETY: walking the control messages recvmsg wrote.
                unsafe {
                    let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
                    while !c.is_null() {
                        if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                            let aux: libc::tpacket_auxdata =
                                std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                            status = aux.tp_status;
                        }
                        c = libc::CMSG_NXTHDR(&raw const msg, c);
                    }
                }
                let partial = status & TP_STATUS_CSUMNOTREADY != 0;
                match check(&frame[..n as usize], partial) {
                    Some(Ok(())) if partial => seen.partial += 1,
                    Some(Ok(())) => seen.complete += 1,
                    Some(Err(e)) => seen.bad.push(e),
                    None => {}
                }
            }
            Ok(seen)
        })();
        let _ = done_tx.send(result);
    })?;
    rx.recv_timeout(Duration::from_secs(5))
        .context("capture socket not ready")?;
    Ok(done_rx)
}

fn run(family: Family, snat: bool) -> Result<()> {
    let tag = if snat { "cs" } else { "cd" };
    let topo = Topology::new(tag, 1)?;
    let _servers = topo.serve(family, 8080)?;
    topo.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    let backend = SocketAddr::new(family.backend(0), 8080);
    let text = sluice_tests::one_service_yaml(1, family, snat, backend);
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let _agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    // The capture threads stop when this goes, whichever way the test ends.
    let stop = StopOnDrop::new();
    let at_client = capture(&topo.client, stop.flag())?;
    let at_backend = capture(&topo.backends[0], stop.flag())?;
    let vip = SocketAddr::new(family.vip(), 80);
    topo.client.enter(|| -> Result<()> {
        for _ in 0..CONNECTIONS {
            tcp_ask(vip, Duration::from_secs(3))?;
        }
        Ok(())
    })??;
    std::thread::sleep(Duration::from_millis(200));
    stop.stop();
    for (side, handle) in [("client", at_client), ("backend", at_backend)] {
        let seen = handle
            .recv_timeout(Duration::from_secs(5))
            .context("capture thread ended without a result")??;
        assert!(
            seen.bad.is_empty(),
            "{side}: {} bad checksums (of {} partial, {} complete): {:?}",
            seen.bad.len(),
            seen.partial,
            seen.complete,
            &seen.bad[..seen.bad.len().min(3)]
        );
        assert!(
            seen.partial + seen.complete >= 3 * CONNECTIONS,
            "{side}: only {seen:?} TCP packets captured for {CONNECTIONS} connections"
        );
        eprintln!("{family:?} snat={snat} {side}: {seen:?}");
    }
    Ok(())
}

#[test]
fn ipv4_dnat_checksums_are_right_where_they_arrive() -> Result<()> {
    run(Family::V4, false)
}

#[test]
fn ipv4_snat_checksums_are_right_where_they_arrive() -> Result<()> {
    run(Family::V4, true)
}

#[test]
fn ipv6_dnat_checksums_are_right_where_they_arrive() -> Result<()> {
    run(Family::V6, false)
}

#[test]
fn ipv6_snat_checksums_are_right_where_they_arrive() -> Result<()> {
    run(Family::V6, true)
}
