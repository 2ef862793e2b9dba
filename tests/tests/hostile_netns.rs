//! An attacker in the client's namespace, against the real agent in its
//! default attach mode: for its own connects (raw SYNs it sends itself) it
//! forges the answers that would count against a backend: RSTs and ICMP
//! "host unreachable" claiming to come from each backend, ICMP from itself,
//! SYNs with TTL 1 or a bad checksum "retransmitted" past the connect
//! timeout. With a threshold of 3 failures from one client, any counted
//! forgery would eject a backend within a few rounds; none may count.

use std::{net::SocketAddr, thread, time::Duration};

use anyhow::{Result, ensure};
use sluice_tests::{
    Agent, TempDir, http_get, metric,
    packet::{CLIENT_SEQ, Pkt, TCP_ACK, TCP_RST, TCP_SYN, icmp_unreachable},
    raw::{RawSender, mac_of},
};
use testbed::{Family, Topology};

const FAM: Family = Family::V4;
const PORT: u16 = 8080;
const HOST_UNREACHABLE: u8 = 1;

#[test]
fn forged_answers_from_the_clients_side_never_eject() -> Result<()> {
    let topo = Topology::new("hx", 3)?;
    let _servers = topo.serve(FAM, PORT)?;
    topo.warm_neighbours()?;
    let dir = TempDir::new("hx")?;
    let mut text = sluice_tests::interfaces_yaml(3);
    text += &format!(
        "services:\n  - name: web\n    vip: {}\n    port: 80\n    protocol: tcp\n    failure:\n      consecutive_failures: 3\n      connect_timeout_ms: 100\n      min_distinct_clients: 1\n      max_ejected_percent: 100\n    backends:\n",
        FAM.vip()
    );
    for i in 0..3 {
        text += &format!(
            "      - address: {}\n",
            SocketAddr::new(FAM.backend(i), PORT)
        );
    }
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    let lb_mac = mac_of(&topo.lb, "front")?;
    let my_mac = mac_of(&topo.client, "eth0")?;
    let raw = RawSender::open(&topo.client, "eth0")?;
    let client = FAM.client();
    let to_lb = |p: Pkt| Pkt {
        smac: my_mac,
        dmac: lb_mac,
        ..p
    };
    for round in 0..10u16 {
        // A connect of the attacker's own, and at once the forged answers
        // (before the backend's SYN-ACK), as if from every backend.
        let port = 40_000 + round;
        raw.send(&to_lb(Pkt::tcp(client, port, FAM.vip(), 80, TCP_SYN)).bytes());
        for b in 0..3 {
            let backend = FAM.backend(b);
            let rst = Pkt {
                ack: CLIENT_SEQ.wrapping_add(1),
                ..Pkt::tcp(backend, PORT, client, port, TCP_RST | TCP_ACK)
            };
            raw.send(&to_lb(rst).bytes());
            // The SYN as the LB forwarded it, quoted by a forged ICMP error
            // from the backend's address, and from the client's own.
            let quoted = Pkt::tcp(client, port, backend, PORT, TCP_SYN).bytes();
            for src in [backend, client] {
                raw.send(&icmp_unreachable(
                    my_mac,
                    lb_mac,
                    src,
                    client,
                    HOST_UNREACHABLE,
                    &quoted,
                ));
            }
        }
        // SYNs that never reach a backend, sent again past the timeout.
        let ttl1 = Pkt {
            ttl: 1,
            ..Pkt::tcp(client, port + 1000, FAM.vip(), 80, TCP_SYN)
        };
        let mut bad = to_lb(Pkt::tcp(client, port + 2000, FAM.vip(), 80, TCP_SYN)).bytes();
        bad[14 + 20 + 16] ^= 0x5a;
        for _ in 0..2 {
            raw.send(&to_lb(ttl1.clone()).bytes());
            raw.send(&bad);
            thread::sleep(Duration::from_millis(150));
        }
    }
    // Real clients are served by all three backends meanwhile.
    let vip = SocketAddr::new(FAM.vip(), 80);
    for _ in 0..30 {
        topo.client
            .enter(|| testbed::tcp_ask(vip, Duration::from_secs(3)))??;
    }

    let metrics = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    for b in 0..3 {
        let backend = SocketAddr::new(FAM.backend(b), PORT).to_string();
        for reason in ["refused", "timeout", "unreachable"] {
            let n = metric(
                &metrics,
                "sluice_backend_failures_total",
                &[
                    ("service", "web"),
                    ("backend", &backend),
                    ("reason", reason),
                ],
            )
            .unwrap_or(0.0);
            ensure!(
                n == 0.0,
                "{backend}: {n} {reason} failures counted from forgeries"
            );
        }
        let ejections = metric(
            &metrics,
            "sluice_backend_ejections_total",
            &[("service", "web"), ("backend", &backend)],
        )
        .unwrap_or(0.0);
        ensure!(ejections == 0.0, "{backend} ejected {ejections} times");
    }
    let untrusted = metric(
        &metrics,
        "sluice_service_untrusted_signals_total",
        &[("service", "web")],
    )
    .unwrap_or(0.0);
    let dropped =
        |reason: &str| metric(&metrics, "sluice_drops_total", &[("reason", reason)]).unwrap_or(0.0);
    let passed = |reason: &str| {
        metric(&metrics, "sluice_passed_total", &[("reason", reason)]).unwrap_or(0.0)
    };
    println!(
        "untrusted signals {untrusted}, bad_checksum {}, ttl_exceeded {}",
        dropped("bad_checksum"),
        passed("ttl_exceeded")
    );
    ensure!(
        dropped("bad_checksum") >= 20.0,
        "bad-checksum SYNs not dropped"
    );
    ensure!(
        passed("ttl_exceeded") >= 20.0,
        "TTL-1 SYNs not passed to the kernel"
    );
    Ok(())
}
