//! A random-source SYN flood, as a botnet (or a spoofing attacker) sends it:
//! SYNs from addresses and ports that never connect again, to one VIP. The
//! sources stay inside the test's own range (`SOURCES`), routed back to the
//! client's namespace, whose kernel resets the SYN-ACKs it never asked for,
//! as a real network's hosts would.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Result;
use testbed::{Family, Topology};

use crate::{
    packet::{Pkt, TCP_SYN},
    raw::RawSender,
};

/// The flood's source addresses: 10.77.0.0/16.
pub const SOURCES: &str = "10.77.0.0/16";

/// Routes `SOURCES` from the LB to the client's namespace, and makes the
/// client's kernel take them as its own (so it answers their SYN-ACKs with
/// resets, and nothing leaves the test bed).
pub fn route_sources(topo: &Topology) -> Result<()> {
    let client = Family::V4.client().to_string();
    topo.lb
        .exec(&["ip", "route", "add", SOURCES, "via", &client])?;
    topo.client
        .exec(&["ip", "route", "add", "local", SOURCES, "dev", "lo"])?;
    Ok(())
}

/// Sends SYNs from random sources in `SOURCES` and random ports to `target`
/// through `sender` (frames addressed to `lb_mac`), as fast as one thread
/// does, until `stop`. Returns how many were sent. `seed` picks the
/// sequence of sources.
pub fn syn_flood(
    sender: &RawSender,
    lb_mac: [u8; 6],
    target: SocketAddrV4,
    seed: u32,
    stop: &Arc<AtomicBool>,
) -> u64 {
    let mut sent = 0u64;
    // xorshift: cheap randomness for addresses and ports (never zero).
    let mut x: u32 = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    while !stop.load(Ordering::Relaxed) {
        let r = next();
        let src = Ipv4Addr::new(10, 77, (r >> 8) as u8, r as u8);
        let syn = Pkt {
            dmac: lb_mac,
            ..Pkt::tcp(
                src.into(),
                1024 + (r >> 16) as u16 % 60_000,
                (*target.ip()).into(),
                target.port(),
                TCP_SYN,
            )
        };
        let frame = syn.bytes();
        // A batch per frame built: building costs more than sending.
        for _ in 0..8 {
            if sender.send(&frame) {
                sent += 1;
            }
        }
    }
    sent
}
