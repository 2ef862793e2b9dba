//! Socket-level balancing for node-local clients: a process in the attached
//! cgroup connects to the VIP and reaches a backend without any packet to
//! the VIP (no XDP translation involved), `getpeername` and `recvfrom` show
//! the VIP, UDP request/reply works, and a refusing backend is counted and
//! ejected through the socket state tracepoint, as on the packet path. IPv4
//! and IPv6.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Result;
use serde_json::Value;
use sluice_tests::{Agent, Bpffs, Cgroup, TempDir, backend_states, http_get, metric, wait_for};
use testbed::{Family, Topology};

const TCP_CLIENT: &str = r#"
import json, socket
for i in range(COUNT):
    try:
        s = socket.create_connection(("10.100.0.1", 80), timeout=3)
    except ConnectionRefusedError:
        print(json.dumps({"refused": True})); continue
    peer = s.getpeername()
    s.sendall(b"hello\n")
    reply = b""
    while True:
        d = s.recv(4096)
        if not d: break
        reply += d
    s.close()
    print(json.dumps({"peer": list(peer), "reply": reply.decode()}))
"#;

const UDP_CLIENT: &str = r#"
import json, socket
for i in range(COUNT):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(3)
    if i % 2:
        u.connect(("10.100.0.1", 80)); u.send(b"hello")
        data = u.recv(2048); src = u.getpeername()
    else:
        u.sendto(b"hello", ("10.100.0.1", 80))
        data, src = u.recvfrom(2048)
    u.close()
    print(json.dumps({"peer": list(src), "reply": data.decode()}))
"#;

fn config(cgroup: &Cgroup, pins: &Bpffs) -> String {
    let mut text = sluice_tests::interfaces_yaml(3);
    text += &format!(
        "socket_lb:\n  cgroup: {}\npinning:\n  directory: {}\nservices:\n",
        cgroup.path.display(),
        pins.0.join("sk").display()
    );
    for proto in ["tcp", "udp"] {
        text += &format!(
            "  - name: web-{proto}\n    vip: 10.100.0.1\n    port: 80\n    protocol: {proto}\n    failure:\n      ejection_seconds: 300\n      min_distinct_clients: 1\n    backends:\n"
        );
        for i in 0..3 {
            text += &format!("      - address: 10.1.{i}.2:8080\n");
        }
        text += &format!(
            "  - name: web6-{proto}\n    vip: \"fd64::1\"\n    port: 80\n    protocol: {proto}\n    backends:\n"
        );
        for i in 0..3 {
            text += &format!("      - address: \"[fd01:{i}::2]:8080\"\n");
        }
    }
    text
}

/// Packets the XDP path translated from the TCP VIP to a backend: none
/// while the socket hooks do the balancing.
fn packets_to_backends_via_the_vip(metrics: &str) -> Option<f64> {
    metric(
        metrics,
        "sluice_service_packets_total",
        &[("service", "web-tcp"), ("direction", "to_backend")],
    )
}

fn by_backend(results: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in results {
        if let Some(reply) = r["reply"].as_str() {
            let name = reply.split_whitespace().next().unwrap_or("").to_string();
            *counts.entry(name).or_default() += 1;
        }
    }
    counts
}

#[test]
fn cgroup_clients_reach_backends_see_the_vip_and_failures_eject() -> Result<()> {
    let topo = Topology::new("sk", 3)?;
    let mut servers = topo.serve(Family::V4, 8080)?;
    let _servers6 = topo.serve(Family::V6, 8080)?;
    topo.warm_neighbours()?;
    let dir = TempDir::new("sk")?;
    let cgroup = Cgroup::new(&dir, "sluice-sk-")?;
    let pins = Bpffs::mount(&dir)?;
    std::fs::write(dir.path("sluice.yaml"), config(&cgroup, &pins))?;
    let mut agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    // TCP: every connection reaches a backend; the application sees the VIP.
    let tcp = cgroup.run_python(&topo.client.name, &TCP_CLIENT.replace("COUNT", "60"))?;
    assert_eq!(tcp.len(), 60);
    for r in &tcp {
        assert_eq!(r["peer"], serde_json::json!(["10.100.0.1", 80]), "{r}");
        // The backend saw the client's own address: no NAT on the way.
        assert!(
            r["reply"].as_str().unwrap_or("").contains("10.0.1.2"),
            "{r}"
        );
    }
    let counts = by_backend(&tcp);
    assert_eq!(counts.len(), 3, "spread over every backend: {counts:?}");

    // UDP, unconnected (sendto/recvfrom) and connected: replies come "from"
    // the VIP.
    let udp = cgroup.run_python(&topo.client.name, &UDP_CLIENT.replace("COUNT", "40"))?;
    assert_eq!(udp.len(), 40);
    for r in &udp {
        assert_eq!(r["peer"], serde_json::json!(["10.100.0.1", 80]), "{r}");
    }

    // IPv6: the same through connect6/sendmsg6/recvmsg6/getpeername6.
    let script6 = TCP_CLIENT
        .replace("\"10.100.0.1\"", "\"fd64::1\"")
        .replace("list(peer)", "list(peer)[:2]")
        .replace("COUNT", "30");
    let tcp6 = cgroup.run_python(&topo.client.name, &script6)?;
    assert_eq!(tcp6.len(), 30);
    for r in &tcp6 {
        assert_eq!(r["peer"], serde_json::json!(["fd64::1", 80]), "{r}");
        assert!(
            r["reply"].as_str().unwrap_or("").contains("fd00:1::2"),
            "{r}"
        );
    }
    assert_eq!(by_backend(&tcp6).len(), 3, "{:?}", by_backend(&tcp6));
    let udp6 = cgroup.run_python(
        &topo.client.name,
        &UDP_CLIENT
            .replace("AF_INET", "AF_INET6")
            .replace("\"10.100.0.1\"", "\"fd64::1\"")
            .replace("list(src)", "list(src)[:2]")
            .replace("COUNT", "20"),
    )?;
    assert_eq!(udp6.len(), 20);
    for r in &udp6 {
        assert_eq!(r["peer"], serde_json::json!(["fd64::1", 80]), "{r}");
    }

    // The balancing happened at the socket: the same counters as the packet
    // path, but no packet to the VIP went through the XDP program.
    let (_, m) = http_get(&topo.lb, agent.listen, "/metrics")?;
    let conns = metric(
        &m,
        "sluice_service_connections_total",
        &[("service", "web-tcp")],
    );
    assert!(conns.is_some_and(|c| c >= 60.0), "connections {conns:?}");
    let udp_conns = metric(
        &m,
        "sluice_service_connections_total",
        &[("service", "web-udp")],
    );
    assert!(
        udp_conns.is_some_and(|c| c >= 40.0),
        "udp connections {udp_conns:?}"
    );
    assert_eq!(packets_to_backends_via_the_vip(&m), Some(0.0));
    // Connect latency came from the tracepoint.
    let latency = metric(
        &m,
        "sluice_backend_connect_latency_seconds_count",
        &[("service", "web-tcp")],
    );
    assert!(
        latency.is_some_and(|n| n >= 60.0),
        "latency samples {latency:?}"
    );

    // Backend 1 refuses: counted by the tracepoint, ejected after 3.
    servers.remove(1);
    let after = cgroup.run_python(&topo.client.name, &TCP_CLIENT.replace("COUNT", "60"))?;
    let refused = after.iter().filter(|r| r["refused"] == true).count();
    assert!((1..=3).contains(&refused), "{refused} refused");
    let (_, m) = http_get(&topo.lb, agent.listen, "/metrics")?;
    assert_eq!(
        metric(
            &m,
            "sluice_backend_failures_total",
            &[
                ("service", "web-tcp"),
                ("backend", "10.1.1.2:8080"),
                ("reason", "refused")
            ]
        ),
        Some(3.0)
    );
    wait_for("backend 1 ejected", Duration::from_secs(5), || {
        Ok(
            backend_states(&topo.lb, &agent, "web-tcp")?.get("10.1.1.2:8080")
                == Some(&"ejected".to_string()),
        )
    })?;
    let later = cgroup.run_python(&topo.client.name, &TCP_CLIENT.replace("COUNT", "30"))?;
    assert!(
        later.iter().all(|r| r["refused"] != true),
        "refusals after the ejection"
    );
    assert!(!by_backend(&later).contains_key("b1"));

    // kill -9: the pinned hooks keep balancing on their own (and keep the
    // ejection); a restarted agent replaces them with no gap.
    agent.kill9()?;
    let alone = cgroup.run_python(&topo.client.name, &TCP_CLIENT.replace("COUNT", "30"))?;
    for r in &alone {
        assert_eq!(r["peer"], serde_json::json!(["10.100.0.1", 80]), "{r}");
    }
    assert!(!by_backend(&alone).contains_key("b1"));
    assert_eq!(by_backend(&alone).values().sum::<usize>(), 30);
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent2.log"))?;
    assert!(agent.log_text().contains("pinned=true"));
    // Still no packet to the VIP reached the XDP path (the counters are
    // pinned too): the hooks balanced while no agent ran.
    let (_, m) = http_get(&topo.lb, agent.listen, "/metrics")?;
    assert_eq!(packets_to_backends_via_the_vip(&m), Some(0.0));
    let again = cgroup.run_python(&topo.client.name, &TCP_CLIENT.replace("COUNT", "30"))?;
    assert_eq!(by_backend(&again).values().sum::<usize>(), 30);
    Ok(())
}
