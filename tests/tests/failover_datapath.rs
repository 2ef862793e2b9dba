//! Failure accounting state transitions through BPF_PROG_TEST_RUN: SYN → RST
//! (refused, held back, retried), SYN retransmitted past the connect timeout,
//! SYN-ACK (the streak resets, latency recorded), ejection after the
//! threshold, the ejection cap, and where new connections go while backends
//! are ejected.

use std::{net::SocketAddr, time::Duration};

use agent_common::reason;
use anyhow::Result;
use sluice_tests::{
    fib::{FibBed, T0_MAC, XDP_DROP, XDP_REDIRECT, backend_mac, backend_of},
    packet::{CLIENT_SEQ, Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use testbed::Family;

const FAM: Family = Family::V4;

fn services(retry: bool, backends: &[usize], max_ejected_percent: u32) -> String {
    let mut text = format!(
        "services:\n  - name: web\n    vip: \"{}\"\n    port: 80\n    protocol: tcp\n    failure:\n      consecutive_failures: 3\n      connect_timeout_ms: 20\n      retry_on_refused: {retry}\n      max_ejected_percent: {max_ejected_percent}\n      min_distinct_clients: 1\n    backends:\n",
        FAM.vip()
    );
    for &i in backends {
        text += &format!(
            "      - address: \"{}\"\n",
            SocketAddr::new(FAM.backend(i), 8080)
        );
    }
    text
}

fn syn(port: u16) -> Pkt {
    Pkt::tcp(FAM.client(), port, FAM.vip(), 80, TCP_SYN)
}

/// Which backend a forwarded frame went to.
/// The backend's answer to the client's SYN on `port` (it acknowledges
/// the SYN).
fn answer(backend: usize, port: u16, flags: u8) -> Pkt {
    Pkt {
        smac: backend_mac(backend),
        dmac: T0_MAC,
        ack: CLIENT_SEQ.wrapping_add(1),
        ..Pkt::tcp(FAM.backend(backend), 8080, FAM.client(), port, flags)
    }
}

fn backend_stats(bed: &FibBed, i: usize) -> agent_common::ServiceStats {
    bed.reconciler.stats(false, backend_id(bed, i))
}

fn backend_id(bed: &FibBed, i: usize) -> u32 {
    bed.backend_id("web", SocketAddr::new(FAM.backend(i), 8080))
}

#[test]
fn refused_syn_is_held_back_and_retried_on_another_backend() -> Result<()> {
    let mut bed = FibBed::new(&services(true, &[0, 1, 2], 50))?;
    let (rc, out) = bed.run(&syn(41_000).bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    let first = backend_of(&out);

    // The backend refuses: counted, and the RST is not forwarded.
    let (rc, _) = bed.run_in("t0", &answer(first, 41_000, TCP_RST | TCP_ACK).bytes())?;
    assert_eq!(rc, XDP_DROP, "the refusal is held back");
    assert_eq!(bed.reason(reason::RST_HELD_FOR_RETRY), 1);
    assert_eq!(backend_stats(&bed, first).failures_refused, 1);
    assert_eq!(
        bed.reconciler
            .health(backend_id(&bed, first))
            .consecutive_failures,
        1
    );

    // The client's retransmitted SYN goes to another backend.
    let (rc, out) = bed.run(&syn(41_000).bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    let second = backend_of(&out);
    assert_ne!(second, first, "retried on another backend");
    let service_id = bed.reconciler.services["web"].id;
    assert_eq!(bed.reconciler.stats(true, service_id).retries, 1);

    // The new backend's SYN-ACK reaches the client; the old backend's late
    // packets of this flow are not translated any more.
    let (rc, _) = bed.run_in("t0", &answer(second, 41_000, TCP_SYN | TCP_ACK).bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(backend_stats(&bed, second).opened, 1);
    Ok(())
}

#[test]
fn without_retry_the_refusal_reaches_the_client() -> Result<()> {
    let mut bed = FibBed::new(&services(false, &[0, 1, 2], 50))?;
    let (_, out) = bed.run(&syn(41_001).bytes())?;
    let first = backend_of(&out);
    let (rc, _) = bed.run_in("t0", &answer(first, 41_001, TCP_RST | TCP_ACK).bytes())?;
    assert_eq!(rc, XDP_REDIRECT, "RST forwarded to the client");
    assert_eq!(backend_stats(&bed, first).failures_refused, 1);
    Ok(())
}

#[test]
fn syn_retransmitted_after_the_connect_timeout_counts_and_retries() -> Result<()> {
    let mut bed = FibBed::new(&services(true, &[0, 1, 2], 50))?;
    let (_, out) = bed.run(&syn(41_002).bytes())?;
    let first = backend_of(&out);
    // An early retransmission (within the timeout) stays on the backend.
    let (_, out) = bed.run(&syn(41_002).bytes())?;
    assert_eq!(backend_of(&out), first);
    assert_eq!(backend_stats(&bed, first).failures_timeout, 0);

    std::thread::sleep(Duration::from_millis(50));
    let (rc, out) = bed.run(&syn(41_002).bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(backend_stats(&bed, first).failures_timeout, 1);
    assert_ne!(backend_of(&out), first, "retried on another backend");
    Ok(())
}

#[test]
fn syn_ack_resets_the_streak_and_records_latency() -> Result<()> {
    let mut bed = FibBed::new(&services(false, &[1], 50))?;
    let id = backend_id(&bed, 1);
    for (n, port) in (42_000..42_002).enumerate() {
        bed.run(&syn(port).bytes())?;
        bed.run_in("t0", &answer(1, port, TCP_RST | TCP_ACK).bytes())?;
        assert_eq!(bed.reconciler.health(id).consecutive_failures, n as u64 + 1);
    }
    bed.run(&syn(42_010).bytes())?;
    std::thread::sleep(Duration::from_millis(2));
    bed.run_in("t0", &answer(1, 42_010, TCP_SYN | TCP_ACK).bytes())?;
    assert_eq!(
        bed.reconciler.health(id).consecutive_failures,
        0,
        "success resets"
    );
    let latency = bed.reconciler.latency(id);
    assert_eq!(latency.count, 1);
    assert!(latency.sum_ns >= 2_000_000, "latency {} ns", latency.sum_ns);
    assert_eq!(latency.buckets.iter().sum::<u64>(), 1);
    // A second SYN-ACK (retransmitted) is not a second connection.
    bed.run_in("t0", &answer(1, 42_010, TCP_SYN | TCP_ACK).bytes())?;
    assert_eq!(bed.reconciler.latency(id).count, 1);
    Ok(())
}

#[test]
fn ejected_after_the_threshold_and_new_flows_skip_it() -> Result<()> {
    let mut bed = FibBed::new(&services(false, &[0, 1, 2], 50))?;
    let victim = backend_of(&bed.run(&syn(43_000).bytes())?.1);
    let id = backend_id(&bed, victim);
    bed.run_in("t0", &answer(victim, 43_000, TCP_RST | TCP_ACK).bytes())?;
    // Two more refusals from the same backend, on flows that land there.
    let mut refused = 1;
    let mut port = 43_001;
    while refused < 3 {
        let (_, out) = bed.run(&syn(port).bytes())?;
        if backend_of(&out) == victim {
            bed.run_in("t0", &answer(victim, port, TCP_RST | TCP_ACK).bytes())?;
            refused += 1;
            assert_eq!(bed.reconciler.health(id).ejected, u32::from(refused == 3));
        }
        port += 1;
    }
    assert_eq!(bed.reconciler.health(id).ejections, 1);
    for port in 44_000..44_100 {
        let (_, out) = bed.run(&syn(port).bytes())?;
        assert_ne!(
            backend_of(&out),
            victim,
            "a new flow went to the ejected backend"
        );
    }
    Ok(())
}

#[test]
fn ejections_stop_at_max_ejected_percent() -> Result<()> {
    // 3 backends, 34%: one may be ejected, then the service fails open.
    let mut bed = FibBed::new(&services(false, &[0, 1, 2], 34))?;
    for port in 45_000..45_100 {
        let (_, out) = bed.run(&syn(port).bytes())?;
        bed.run_in(
            "t0",
            &answer(backend_of(&out), port, TCP_RST | TCP_ACK).bytes(),
        )?;
    }
    let ejected: Vec<usize> = (0..3)
        .filter(|&i| bed.reconciler.health(backend_id(&bed, i)).ejected == 1)
        .collect();
    assert_eq!(
        ejected.len(),
        1,
        "only one of three may be ejected: {ejected:?}"
    );
    let service_id = bed.reconciler.services["web"].id;
    assert!(bed.reconciler.stats(true, service_id).fail_open > 0);
    Ok(())
}

/// Refuses new flows until every backend but `keep` is ejected; returns the
/// next free client port.
fn eject_all_but(bed: &mut FibBed, keep: usize, mut port: u16) -> Result<u16> {
    let others: Vec<u32> = (0..3)
        .filter(|&i| i != keep)
        .map(|i| backend_id(bed, i))
        .collect();
    while others
        .iter()
        .any(|&id| bed.reconciler.health(id).ejected != 1)
    {
        let (_, out) = bed.run(&syn(port).bytes())?;
        let b = backend_of(&out);
        if b != keep {
            bed.run_in("t0", &answer(b, port, TCP_RST | TCP_ACK).bytes())?;
        }
        port += 1;
    }
    Ok(port)
}

/// With two of three backends ejected, a rehash lands on an ejected one two
/// times in three: eight in a row happen for one flow in 26. The walk after
/// the rehashes still finds the healthy backend, for every flow.
#[test]
fn new_flows_find_the_healthy_backend_however_unlucky_their_hash() -> Result<()> {
    let mut bed = FibBed::new(&services(false, &[0, 1, 2], 100))?;
    let port = eject_all_but(&mut bed, 1, 46_000)?;
    let strays = (port..port + 2_000)
        .filter(|&p| {
            bed.run(&syn(p).bytes())
                .map(|(_, out)| backend_of(&out) != 1)
                .unwrap_or(true)
        })
        .count();
    assert_eq!(strays, 0, "new flows sent to an ejected backend");
    Ok(())
}

/// A new connection on the 5-tuple of a closed flow whose backend has been
/// ejected goes where a new flow would, and is a new connection there, not
/// a retry.
#[test]
fn reused_tuple_of_an_ejected_backend_is_a_new_connection() -> Result<()> {
    let mut bed = FibBed::new(&services(false, &[0, 1, 2], 100))?;
    // A flow that lands on backend 0, opens and closes.
    let reused = (47_000..)
        .find(|&p| {
            bed.run(&syn(p).bytes())
                .is_ok_and(|(_, out)| backend_of(&out) == 0)
        })
        .unwrap();
    bed.run_in("t0", &answer(0, reused, TCP_SYN | TCP_ACK).bytes())?;
    bed.run(&Pkt::tcp(FAM.client(), reused, FAM.vip(), 80, TCP_RST | TCP_ACK).bytes())?;
    eject_all_but(&mut bed, 2, 48_000)?;
    let service_id = bed.reconciler.services["web"].id;
    let retries = bed.reconciler.stats(true, service_id).retries;
    let connections = (
        backend_stats(&bed, 0).connections,
        backend_stats(&bed, 2).connections,
    );

    let (rc, out) = bed.run(&syn(reused).bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(backend_of(&out), 2, "the only backend not ejected");
    assert_eq!(
        bed.reconciler.stats(true, service_id).retries,
        retries,
        "not a retry"
    );
    assert_eq!(
        (
            backend_stats(&bed, 0).connections,
            backend_stats(&bed, 2).connections
        ),
        (connections.0, connections.1 + 1),
        "a new connection of backend 2 only"
    );
    Ok(())
}

/// A client that gives up on a connect without a RST Sluice sees (its
/// SYN-ACK lost, or the socket closed while connecting) may reuse the port
/// at once: a SYN with another initial sequence number on a half-open flow
/// is a new connection, counted, whose SYN-ACK is trusted and whose
/// handshake completes; so is one after that connection's FIN close. (Taken
/// for a retransmission, it went uncounted and its flow never left the
/// half-open table: a rare lost connection in long runs of short ones.)
#[test]
fn a_syn_with_a_new_sequence_number_on_a_reused_port_is_a_new_connection() -> Result<()> {
    let mut bed = FibBed::new(&services(false, &[1], 50))?;
    let service_id = bed.reconciler.services["web"].id;
    let service = |bed: &FibBed| bed.reconciler.stats(true, service_id);
    let syn_with = |port: u16, seq: u32| Pkt { seq, ..syn(port) };
    let answer_to = |port: u16, seq: u32, flags: u8| Pkt {
        ack: seq.wrapping_add(1),
        ..answer(1, port, flags)
    };
    let from_client = |port: u16, seq: u32, flags: u8| Pkt {
        seq: seq.wrapping_add(1),
        ..Pkt::tcp(FAM.client(), port, FAM.vip(), 80, flags)
    };
    let port = 45_000;

    // 1. A connect answered by the backend, then abandoned by the client (no
    //    ACK, no RST): the next SYN on the port has a new number.
    bed.run(&syn_with(port, 1_000).bytes())?;
    bed.run_in("t0", &answer_to(port, 1_000, TCP_SYN | TCP_ACK).bytes())?;
    // 2. A connect abandoned before any answer, within the connect timeout.
    bed.run(&syn_with(port, 2_000).bytes())?;
    let before = service(&bed);
    assert_eq!((before.connections, before.opened), (2, 1));
    let (rc, out) = bed.run(&syn_with(port, 3_000).bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(backend_of(&out), 1);
    let (rc, _) = bed.run_in("t0", &answer_to(port, 3_000, TCP_SYN | TCP_ACK).bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    let after = service(&bed);
    assert_eq!(after.connections, 3, "each new number is a new connection");
    assert_eq!(after.opened, 2, "the SYN-ACK to the last one is trusted");
    assert_eq!(after.untrusted_signals, 0);
    assert_eq!(after.failures_timeout + after.failures_refused, 0);

    // Its handshake completes and it closes (FINs both ways); a SYN with a
    // new number after that is a new connection too.
    bed.run(&from_client(port, 3_000, TCP_ACK).bytes())?;
    bed.run(&from_client(port, 3_000, TCP_FIN | TCP_ACK).bytes())?;
    bed.run_in("t0", &answer_to(port, 3_000, TCP_FIN | TCP_ACK).bytes())?;
    assert_eq!(
        service(&bed).closed,
        1,
        "closed as an established connection"
    );
    let (rc, _) = bed.run(&syn_with(port, 4_000).bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    bed.run_in("t0", &answer_to(port, 4_000, TCP_SYN | TCP_ACK).bytes())?;
    let last = service(&bed);
    assert_eq!((last.connections, last.opened), (4, 3));
    assert_eq!(last.untrusted_signals, 0);
    Ok(())
}
