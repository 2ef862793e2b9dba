//! Failure signals forged from outside, through BPF_PROG_TEST_RUN with the
//! frames arriving on a real interface of the test namespace (`t1`: the
//! clients' side, `t0`: the backends'): ICMP errors from the clients' side,
//! from the client itself, with codes that don't mean "down"; RSTs from the
//! wrong side, not acknowledging the SYN, or without ACK; SYNs with TTL 1 or
//! bad checksums, which never reach a backend, "retransmitted" past the
//! connect timeout. None may count against a backend, while real failures
//! still eject it after the same number of failed connects.

use std::{net::IpAddr, time::Duration};

use agent_common::reason;
use anyhow::Result;
use sluice_tests::{
    fib::{
        CLIENT_MAC, FibBed, T0_MAC, T1_MAC, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, backend_mac,
        backend_of,
    },
    packet::{CLIENT_SEQ, Pkt, TCP_ACK, TCP_RST, TCP_SYN, checksum, icmp_unreachable},
};
use testbed::Family;

const FAM: Family = Family::V4;

/// ICMP destination-unreachable codes (RFC 792, RFC 1812).
const HOST_UNREACHABLE: u8 = 1;
const PORT_UNREACHABLE: u8 = 3;
const FRAGMENTATION_NEEDED: u8 = 4;
const ADMIN_PROHIBITED: u8 = 13;

fn services(family: Family, min_distinct_clients: u32, retry: bool) -> String {
    let mut text = format!(
        "services:\n  - name: web\n    vip: \"{}\"\n    port: 80\n    protocol: tcp\n    failure:\n      consecutive_failures: 3\n      connect_timeout_ms: 20\n      retry_on_refused: {retry}\n      max_ejected_percent: 100\n      min_distinct_clients: {min_distinct_clients}\n    backends:\n",
        family.vip()
    );
    for i in 0..3 {
        text += &format!("      - address: \"{}\"\n", sockaddr(family.backend(i)));
    }
    text
}

fn sockaddr(ip: IpAddr) -> String {
    std::net::SocketAddr::new(ip, 8080).to_string()
}

fn syn_from(client: IpAddr, port: u16) -> Pkt {
    Pkt {
        smac: CLIENT_MAC,
        dmac: T1_MAC,
        ..Pkt::tcp(client, port, FAM.vip(), 80, TCP_SYN)
    }
}

/// A TCP segment from backend `b` to `client`'s `port`, acknowledging `ack`.
fn from_backend(b: usize, client: IpAddr, port: u16, flags: u8, ack: u32) -> Pkt {
    Pkt {
        smac: backend_mac(b),
        dmac: T0_MAC,
        ack,
        ..Pkt::tcp(FAM.backend(b), 8080, client, port, flags)
    }
}

fn id_of(bed: &FibBed, b: usize) -> u32 {
    bed.backend_id("web", std::net::SocketAddr::new(FAM.backend(b), 8080))
}

/// Failures counted against any backend, of every kind.
fn failures(bed: &FibBed) -> u64 {
    (0..3)
        .map(|b| {
            let s = bed.reconciler.stats(false, id_of(bed, b));
            s.failures_refused + s.failures_timeout + s.failures_unreachable
        })
        .sum()
}

fn ejected(bed: &FibBed) -> Vec<usize> {
    (0..3)
        .filter(|&b| bed.reconciler.health(id_of(bed, b)).ejected != 0)
        .collect()
}

/// Whether a RST's outcome is a SYN sent back out towards a backend: a
/// refusal turned into the client's SYN (see the kernel's `resyn`).
fn resent_syn(rc: u32, out: &[u8]) -> bool {
    rc == XDP_TX && (0..3).any(|i| out[..6] == backend_mac(i))
}

#[test]
fn forged_icmp_and_rsts_never_count_against_a_healthy_backend() -> Result<()> {
    let mut bed = FibBed::new(&services(FAM, 1, true))?;
    let client = FAM.client();
    let rounds = 6; // twice the ejection threshold
    for port in 50_000..50_000 + rounds {
        let (rc, sent) = bed.run_in("t1", &syn_from(client, port).bytes())?;
        assert_eq!(rc, XDP_REDIRECT);
        let b = backend_of(&sent);
        let icmp = |src: IpAddr, code: u8, smac: [u8; 6], dmac: [u8; 6]| {
            icmp_unreachable(smac, dmac, src, client, code, &sent)
        };
        // ICMP "host unreachable" claiming to come from the backend, sent
        // from the clients' side.
        bed.run_in(
            "t1",
            &icmp(FAM.backend(b), HOST_UNREACHABLE, CLIENT_MAC, T1_MAC),
        )?;
        // From the backends' side, but from the client's own address.
        bed.run_in(
            "t0",
            &icmp(client, HOST_UNREACHABLE, backend_mac(b), T0_MAC),
        )?;
        // From the backend, with codes that don't say it is down: a path
        // MTU (translated for the client) and a firewall's refusal.
        bed.run_in(
            "t0",
            &icmp(FAM.backend(b), FRAGMENTATION_NEEDED, backend_mac(b), T0_MAC),
        )?;
        bed.run_in(
            "t0",
            &icmp(FAM.backend(b), ADMIN_PROHIBITED, backend_mac(b), T0_MAC),
        )?;
        // A RST from the backend's address that acknowledges the SYN, from
        // the clients' side.
        let rst = from_backend(b, client, port, TCP_RST | TCP_ACK, CLIENT_SEQ + 1);
        let spoofed = Pkt {
            smac: CLIENT_MAC,
            dmac: T1_MAC,
            ..rst.clone()
        };
        // None of the forged RSTs becomes the client's SYN towards another
        // backend (`resyn`): that is for a refusal held back, only.
        let (rc, out) = bed.run_in("t1", &spoofed.bytes())?;
        assert!(!resent_syn(rc, &out), "a spoofed RST resent the SYN");
        // From the backends' side, but not acknowledging the SYN, and
        // without ACK at all.
        let wrong_ack = Pkt {
            ack: CLIENT_SEQ + 1000,
            ..rst.clone()
        };
        let (rc, out) = bed.run_in("t0", &wrong_ack.bytes())?;
        assert_ne!(rc, XDP_DROP, "not held back as a refusal");
        assert!(
            !resent_syn(rc, &out),
            "a RST with the wrong ack resent the SYN"
        );
        let (rc, out) = bed.run_in(
            "t0",
            &from_backend(b, client, port, TCP_RST, CLIENT_SEQ + 1).bytes(),
        )?;
        assert!(!resent_syn(rc, &out), "a RST without ACK resent the SYN");
        assert_eq!(failures(&bed), 0, "a forged signal counted (port {port})");
        // The backend answers: the connect succeeds.
        let syn_ack = from_backend(b, client, port, TCP_SYN | TCP_ACK, CLIENT_SEQ + 1);
        assert_eq!(bed.run_in("t0", &syn_ack.bytes())?.0, XDP_REDIRECT);
    }
    assert_eq!(failures(&bed), 0);
    assert!(ejected(&bed).is_empty());
    // Each forgery but the path MTU message is counted as untrusted.
    let service_id = bed.reconciler.services["web"].id;
    assert_eq!(
        bed.reconciler.stats(true, service_id).untrusted_signals,
        6 * u64::from(rounds),
        "untrusted signals"
    );
    Ok(())
}

/// A SYN that can't reach a backend (TTL 1, bad TCP or IPv4 header
/// checksum) creates no flow, so sending it again past the connect timeout
/// is no timeout; a SYN that did reach one still counts once.
#[test]
fn syns_that_cannot_reach_a_backend_never_become_timeouts() -> Result<()> {
    let mut bed = FibBed::new(&services(FAM, 1, false))?;
    let client = FAM.client();
    let ttl1 = Pkt {
        ttl: 1,
        ..syn_from(client, 51_000)
    };
    let mut bad_tcp = syn_from(client, 51_001).bytes();
    bad_tcp[14 + 20 + 16] ^= 0x5a; // the TCP checksum
    let mut bad_ip = syn_from(client, 51_002).bytes();
    bad_ip[14 + 10] ^= 0x5a; // the IPv4 header checksum
    for _ in 0..4 {
        assert_eq!(bed.run_in("t1", &ttl1.bytes())?.0, XDP_PASS);
        assert_eq!(bed.run_in("t1", &bad_tcp)?.0, XDP_DROP);
        assert_eq!(bed.run_in("t1", &bad_ip)?.0, XDP_DROP);
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(bed.reason(reason::TTL_EXCEEDED), 4);
    assert_eq!(bed.reason(reason::BAD_CHECKSUM), 8);
    assert_eq!(failures(&bed), 0, "timeouts from SYNs that went nowhere");

    // A good SYN, then a bad-checksum copy past the timeout: still nothing.
    let good = syn_from(client, 51_003);
    assert_eq!(bed.run_in("t1", &good.bytes())?.0, XDP_REDIRECT);
    std::thread::sleep(Duration::from_millis(30));
    let mut bad_copy = good.bytes();
    bad_copy[14 + 20 + 16] ^= 0x5a;
    assert_eq!(bed.run_in("t1", &bad_copy)?.0, XDP_DROP);
    assert_eq!(failures(&bed), 0);
    // The real retransmission is the backend's silence: one timeout, and
    // one only however often the client tries again.
    for _ in 0..3 {
        assert_eq!(bed.run_in("t1", &good.bytes())?.0, XDP_REDIRECT);
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(failures(&bed), 1, "one timeout per connect attempt");
    Ok(())
}

/// A SYN from a local sender carries a partial checksum (the pseudo-header
/// sum, finished by the device): it is accepted and verified as whole.
#[test]
fn partial_checksums_of_local_senders_are_accepted() -> Result<()> {
    let mut bed = FibBed::new(&services(FAM, 1, false))?;
    let mut frame = syn_from(FAM.client(), 52_000).bytes();
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (FAM.client(), FAM.vip()) else {
        unreachable!()
    };
    let segment_len = frame.len() - 14 - 20;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(segment_len as u16).to_be_bytes());
    // CHECKSUM_PARTIAL: the folded pseudo-header sum, not complemented.
    let partial = !checksum(&pseudo);
    frame[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&partial.to_be_bytes());
    assert_eq!(bed.run_in("t1", &frame)?.0, XDP_REDIRECT);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(bed.run_in("t1", &frame)?.0, XDP_REDIRECT);
    assert_eq!(failures(&bed), 1, "its silence counts: it was verified");
    Ok(())
}

/// Unreachables from the backend (or a router on its side) with a code
/// that means "down" count, once per connect attempt, and eject after the
/// threshold as before.
#[test]
fn real_unreachables_count_once_per_attempt_and_eject() -> Result<()> {
    let mut bed = FibBed::new(&services(FAM, 1, false))?;
    let client = FAM.client();
    let victim = 1;
    let mut attempts = 0;
    let mut port = 53_000;
    while attempts < 3 {
        let (_, sent) = bed.run_in("t1", &syn_from(client, port).bytes())?;
        if backend_of(&sent) == victim {
            attempts += 1;
            // The backend's port unreachable, then a router's host
            // unreachable about the same SYN: one failure.
            for (src, code) in [
                (FAM.backend(victim), PORT_UNREACHABLE),
                (FAM.backend_gateway(victim), HOST_UNREACHABLE),
            ] {
                let icmp = icmp_unreachable(backend_mac(victim), T0_MAC, src, client, code, &sent);
                assert_eq!(bed.run_in("t0", &icmp)?.0, XDP_PASS);
            }
            let s = bed.reconciler.stats(false, id_of(&bed, victim));
            assert_eq!(s.failures_unreachable, attempts);
            assert_eq!(
                ejected(&bed),
                if attempts == 3 { vec![victim] } else { vec![] },
                "after {attempts} failed connects"
            );
        }
        port += 1;
    }
    Ok(())
}

/// With `min_distinct_clients: 2`, one client's failed connects, however
/// many, don't eject; one more from a second client does.
#[test]
fn one_client_alone_cannot_eject_a_backend() -> Result<()> {
    let mut bed = FibBed::new(&services(FAM, 2, false))?;
    let victim = 2;
    let refuse = |bed: &mut FibBed, client: IpAddr, first_port: u16, n: u64| -> Result<u16> {
        let mut port = first_port;
        let mut refused = 0;
        while refused < n {
            let (_, sent) = bed.run_in("t1", &syn_from(client, port).bytes())?;
            if backend_of(&sent) == victim {
                let rst = from_backend(victim, client, port, TCP_RST | TCP_ACK, CLIENT_SEQ + 1);
                bed.run_in("t0", &rst.bytes())?;
                refused += 1;
            }
            port += 1;
        }
        Ok(port)
    };
    refuse(&mut bed, FAM.client(), 54_000, 6)?;
    let health = bed.reconciler.health(id_of(&bed, victim));
    assert_eq!(health.consecutive_failures, 6);
    assert!(ejected(&bed).is_empty(), "ejected by one client");
    let second: IpAddr = "10.0.1.3".parse()?;
    refuse(&mut bed, second, 55_000, 1)?;
    assert_eq!(ejected(&bed), vec![victim]);
    Ok(())
}

/// IPv6: a SYN with a bad checksum is dropped and creates nothing.
#[test]
fn ipv6_syns_with_bad_checksums_are_dropped() -> Result<()> {
    let fam = Family::V6;
    let mut bed = FibBed::new(&services(fam, 1, false))?;
    let syn = Pkt::tcp(fam.client(), 56_000, fam.vip(), 80, TCP_SYN);
    let mut bad = syn.bytes();
    bad[14 + 40 + 16] ^= 0x5a;
    assert_eq!(bed.run_in("t1", &bad)?.0, XDP_DROP);
    assert_eq!(bed.reason(reason::BAD_CHECKSUM), 1);
    assert_eq!(bed.run_in("t1", &syn.bytes())?.0, XDP_REDIRECT);
    Ok(())
}
