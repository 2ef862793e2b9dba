//! `allowed_sources`: real connections (TCP, and UDP datagrams) from
//! clients inside and outside a service's ranges, IPv4 and IPv6. Allowed
//! clients connect; denied ones get nothing (the connect times out), leave
//! nothing in conntrack and are counted as
//! `sluice_drops_total{reason="source_denied"}`; socket-level balancing
//! refuses a socket bound to a denied address; a forged SYN
//! flood from denied sources creates no state and takes no new-flow
//! budget; a reload that changes the ranges takes effect for new flows
//! while an established flow of a source no longer allowed keeps working.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sluice_tests::{
    Agent, TempDir, control_socket_of, flood, http_get, interfaces_yaml, metric,
    raw::{RawSender, mac_of},
    sluice_bin, tcp_ask_from, tcp_echo_from, wait_for,
};
use testbed::{Family, Topology};

const PORT: u16 = 8080;

/// A second client address on the client's interface, outside the first
/// ranges: 10.0.1.9 and fd00:1::9.
fn other_client(fam: Family) -> IpAddr {
    match fam {
        Family::V4 => "10.0.1.9".parse().unwrap(),
        Family::V6 => "fd00:1::9".parse().unwrap(),
    }
}

fn vip(fam: Family) -> SocketAddr {
    SocketAddr::new(fam.vip(), 80)
}

fn service_name(fam: Family) -> &'static str {
    match fam {
        Family::V4 => "web",
        Family::V6 => "web6",
    }
}

/// Four services on backend 0, each with `allowed_sources: ranges` (None:
/// the key left out): TCP `web` (IPv4) and `web6`, UDP `dns` and `dns6`.
fn config(ranges: Option<&[&str]>) -> String {
    let mut text = interfaces_yaml(1) + "services:\n";
    for (protocol, prefix) in [("tcp", "web"), ("udp", "dns")] {
        for fam in [Family::V4, Family::V6] {
            let name = service_name(fam).replace("web", prefix);
            text += &format!(
                "  - name: {name}\n    vip: \"{}\"\n    port: 80\n    protocol: {protocol}\n    backends:\n      - address: \"{}\"\n",
                fam.vip(),
                SocketAddr::new(fam.backend(0), PORT)
            );
            if let Some(ranges) = ranges {
                let list: Vec<String> = ranges.iter().map(|r| format!("\"{r}\"")).collect();
                text += &format!("    allowed_sources: [{}]\n", list.join(", "));
            }
        }
    }
    text
}

/// One UDP request from `from` (any port) to the family's VIP: the
/// backend's answer.
fn ask_udp(topo: &Topology, from: IpAddr, fam: Family, timeout: Duration) -> Result<String> {
    topo.client.enter(|| -> Result<String> {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(from, 0))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(vip(fam))?;
        socket.send(b"hello")?;
        let mut buf = [0u8; 512];
        let n = socket
            .recv(&mut buf)
            .with_context(|| format!("no UDP answer to {from} from {}", vip(fam)))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })?
}

/// The test bed: one backend serving both families, the client with its
/// second addresses.
fn bed(tag: &str) -> Result<(Topology, Vec<testbed::NameServer>, TempDir)> {
    let topo = Topology::new(tag, 1)?;
    let mut servers = topo.serve(Family::V4, PORT)?;
    servers.extend(topo.serve(Family::V6, PORT)?);
    for fam in [Family::V4, Family::V6] {
        let prefix = if fam == Family::V4 { 24 } else { 64 };
        topo.client.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/{prefix}", other_client(fam)),
            "dev",
            "eth0",
        ])?;
    }
    testbed::wait_for_dad(&topo.client)?;
    topo.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    Ok((topo, servers, dir))
}

/// One connection from `from` (any port) to the family's VIP: the backend's
/// answer (its name and the peer it saw).
fn ask(topo: &Topology, from: IpAddr, fam: Family, timeout: Duration) -> Result<String> {
    topo.client
        .enter(|| tcp_ask_from(SocketAddr::new(from, 0), vip(fam), timeout))?
}

/// `sluice conntrack --service NAME -o json` against the agent of `cfg`.
fn conntrack(cfg: &Path, service: &str) -> Result<Value> {
    let out = Command::new(sluice_bin())
        .args(["conntrack", "--service", service, "-o", "json", "--config"])
        .arg(cfg)
        .arg("--socket")
        .arg(control_socket_of(cfg))
        .stdin(Stdio::null())
        .output()
        .context("running sluice conntrack")?;
    if !out.status.success() {
        bail!(
            "sluice conntrack failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `sluice explain CLIENT:PORT VIP/tcp -o json`'s decision, against the
/// agent of `cfg`.
fn explained(cfg: &Path, client: SocketAddr, vip: SocketAddr) -> Result<String> {
    let out = Command::new(sluice_bin())
        .arg("explain")
        .arg(client.to_string())
        .arg(format!("{vip}/tcp"))
        .args(["-o", "json", "--config"])
        .arg(cfg)
        .arg("--socket")
        .arg(control_socket_of(cfg))
        .stdin(Stdio::null())
        .output()
        .context("running sluice explain")?;
    if !out.status.success() {
        bail!(
            "sluice explain failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    Ok(answer["decision"].as_str().unwrap_or_default().to_string())
}

/// Flows of `service` whose client is `client` (any port).
fn flows_of(cfg: &Path, service: &str, client: IpAddr) -> Result<usize> {
    let flows = conntrack(cfg, service)?;
    let prefix = SocketAddr::new(client, 0).to_string();
    let prefix = prefix.trim_end_matches(":0");
    Ok(flows["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["client"].as_str().is_some_and(|c| c.starts_with(prefix)))
        .count())
}

fn drops(agent: &Agent, topo: &Topology, reason: &str) -> Result<f64> {
    let text = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    Ok(metric(&text, "sluice_drops_total", &[("reason", reason)]).unwrap_or(0.0))
}

#[test]
fn allowed_sources_admit_listed_clients_and_drop_others_both_families_and_follow_reloads()
-> Result<()> {
    let (topo, _servers, dir) = bed("sra")?;
    let cfg = dir.path("sluice.yaml");
    // The first client address is inside, the second outside; each list
    // also carries a block of the other family (accepted, never matching).
    std::fs::write(&cfg, config(Some(&["10.0.1.0/29", "fd00:1::/125"])))?;
    let agent = Agent::start(&topo.lb, &cfg, dir.path("agent.log"))?;

    for fam in [Family::V4, Family::V6] {
        let answer = ask(&topo, fam.client(), fam, Duration::from_secs(3))
            .with_context(|| format!("allowed client {} ({fam:?})", fam.client()))?;
        ensure!(
            answer.starts_with("b0 ") && answer.contains(&fam.client().to_string()),
            "allowed client {}: unexpected answer {answer:?}",
            fam.client()
        );
        let denied = other_client(fam);
        let before = drops(&agent, &topo, "source_denied")?;
        match ask(&topo, denied, fam, Duration::from_secs(2)) {
            Ok(answer) => bail!("denied client {denied} got an answer: {answer:?}"),
            Err(e) => println!("denied client {denied}: {e:#}"),
        }
        let after = drops(&agent, &topo, "source_denied")?;
        println!("{fam:?}: source_denied {before} -> {after}");
        // The SYN and its retransmission within 2 s, at least.
        ensure!(
            after >= before + 1.0,
            "{fam:?}: source_denied went from {before} to {after}"
        );
        // UDP alike: the allowed client's datagram is answered, the
        // denied one's is not (and counted).
        let answer = ask_udp(&topo, fam.client(), fam, Duration::from_secs(2))?;
        ensure!(
            answer.starts_with("b0 "),
            "UDP from the allowed client: {answer:?}"
        );
        let before_udp = drops(&agent, &topo, "source_denied")?;
        if let Ok(answer) = ask_udp(&topo, denied, fam, Duration::from_secs(1)) {
            bail!("UDP from denied client {denied} answered: {answer:?}");
        }
        ensure!(
            drops(&agent, &topo, "source_denied")? > before_udp,
            "the denied datagram was not counted"
        );
        let dns = service_name(fam).replace("web", "dns");
        ensure!(flows_of(&cfg, &dns, denied)? == 0, "a UDP flow of {denied}");
        let left = flows_of(&cfg, service_name(fam), denied)?;
        ensure!(
            left == 0,
            "{left} conntrack entries of denied client {denied}"
        );
        ensure!(
            flows_of(&cfg, service_name(fam), fam.client())? > 0,
            "the allowed client's flow is not in conntrack (the check would prove nothing)"
        );
        // `sluice explain` says so, and lets the allowed client through.
        let decision = explained(&cfg, SocketAddr::new(denied, 40_123), vip(fam))?;
        ensure!(
            decision == "source_denied",
            "explain for {denied}: {decision}"
        );
        let decision = explained(&cfg, SocketAddr::new(fam.client(), 40_123), vip(fam))?;
        ensure!(
            decision == "maglev",
            "explain for {}: {decision}",
            fam.client()
        );
    }

    // An established connection of the first client address, kept open
    // across reloads.
    let (name, mut kept) = topo.client.enter(|| {
        tcp_echo_from(
            SocketAddr::new(Family::V4.client(), 0),
            vip(Family::V4),
            Duration::from_secs(3),
        )
    })??;
    ensure!(name == "b0", "echo connection answered by {name:?}");

    // Now only the second addresses: new flows follow the new ranges, the
    // established flow stays (as kube-proxy keeps established conntrack).
    std::fs::write(&cfg, config(Some(&["10.0.1.8/29", "fd00:1::8/125"])))?;
    agent.reload()?;
    wait_for("the new ranges", Duration::from_secs(10), || {
        Ok(ask(
            &topo,
            other_client(Family::V4),
            Family::V4,
            Duration::from_secs(1),
        )
        .is_ok())
    })?;
    for fam in [Family::V4, Family::V6] {
        let answer = ask(&topo, other_client(fam), fam, Duration::from_secs(3))
            .with_context(|| format!("newly allowed client {}", other_client(fam)))?;
        ensure!(
            answer.contains(&other_client(fam).to_string()),
            "{answer:?}"
        );
        ensure!(
            ask(&topo, fam.client(), fam, Duration::from_secs(2)).is_err(),
            "{}: no longer allowed, but connected",
            fam.client()
        );
    }
    kept.write_all(b"still here\n")?;
    let mut line = String::new();
    BufReader::new(kept.try_clone()?).read_line(&mut line)?;
    ensure!(
        line.trim() == "still here",
        "the established flow of a source no longer allowed broke: {line:?}"
    );

    // No allowed_sources: everyone.
    std::fs::write(&cfg, config(None))?;
    agent.reload()?;
    wait_for("no ranges", Duration::from_secs(10), || {
        Ok(ask(
            &topo,
            Family::V4.client(),
            Family::V4,
            Duration::from_secs(1),
        )
        .is_ok())
    })?;
    for fam in [Family::V4, Family::V6] {
        for from in [fam.client(), other_client(fam)] {
            ask(&topo, from, fam, Duration::from_secs(3))
                .with_context(|| format!("{from} with no allowed_sources"))?;
        }
    }
    Ok(())
}

#[test]
fn a_forged_syn_flood_from_denied_sources_creates_no_state() -> Result<()> {
    let (topo, _servers, dir) = bed("srf")?;
    // The flood's sources (10.77.0.0/16) are routed back to the client's
    // namespace, whose kernel resets SYN-ACKs it never asked for: were a
    // SYN let through, it would show as a flow.
    flood::route_sources(&topo)?;
    let cfg = dir.path("sluice.yaml");
    std::fs::write(&cfg, config(Some(&["10.0.1.0/29", "fd00:1::/125"])))?;
    let agent = Agent::start(&topo.lb, &cfg, dir.path("agent.log"))?;

    let lb_mac = mac_of(&topo.lb, "front")?;
    let sender = RawSender::open(&topo.client, "eth0")?;
    let stop = Arc::new(AtomicBool::new(false));
    let IpAddr::V4(vip4) = Family::V4.vip() else {
        unreachable!()
    };
    let target = SocketAddrV4::new(vip4, 80);
    let flooder = {
        let stop = stop.clone();
        thread::spawn(move || flood::syn_flood(&sender, lb_mac, target, 0x2545_f491, &stop))
    };
    thread::sleep(Duration::from_secs(3));
    // A real client during the flood still connects.
    let during = ask(
        &topo,
        Family::V4.client(),
        Family::V4,
        Duration::from_secs(3),
    );
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().expect("flood thread");
    during.context("the allowed client during the flood")?;

    let denied = drops(&agent, &topo, "source_denied")?;
    let budget = drops(&agent, &topo, "new_flow_budget")?;
    let flows = conntrack(&cfg, "web")?;
    let forged = flows["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| {
            f["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("10.77."))
        })
        .count();
    println!(
        "flood: {sent} forged SYNs; source_denied {denied}; new_flow_budget {budget}; \
         forged flows in conntrack {forged}; flows of the service {}",
        flows["matched"]
    );
    ensure!(sent > 1000, "the flood sent only {sent} SYNs");
    ensure!(forged == 0, "{forged} flows of forged sources in conntrack");
    ensure!(
        denied >= sent as f64 * 0.5,
        "only {denied} of {sent} forged SYNs counted as source_denied"
    );
    ensure!(
        budget == 0.0,
        "denied SYNs took new-flow budget ({budget} dropped over it)"
    );
    Ok(())
}

/// Connects to the IPv4 VIP from `BIND` ("" = not bound): what happened.
const BOUND_CLIENT: &str = r#"
import json, socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
if "BIND":
    s.bind(("BIND", 0))
try:
    s.connect(("10.100.0.1", 80))
    s.sendall(b"hello\n")
    reply = b""
    while True:
        d = s.recv(4096)
        if not d: break
        reply += d
    print(json.dumps({"reply": reply.decode(), "peer": list(s.getpeername())}))
except PermissionError:
    print(json.dumps({"error": "EPERM"}))
except OSError as e:
    print(json.dumps({"error": str(e)}))
"#;

/// Socket-level balancing honours `allowed_sources` where the source is
/// known at connect(): a socket bound to a denied address gets EPERM
/// (counted as source_denied), one bound to an allowed address is
/// balanced at the socket; an unbound one is left to the packet path,
/// which checks its real source.
#[test]
fn socket_level_balancing_checks_bound_sources() -> Result<()> {
    let (topo, _servers, dir) = bed("srs")?;
    let cgroup = sluice_tests::Cgroup::new(&dir, "sluice-srs-")?;
    let cfg = dir.path("sluice.yaml");
    let text = config(Some(&["10.0.1.0/29", "fd00:1::/125"])).replacen(
        "services:\n",
        &format!(
            "socket_lb:\n  cgroup: {}\nservices:\n",
            cgroup.path.display()
        ),
        1,
    );
    std::fs::write(&cfg, text)?;
    let agent = Agent::start(&topo.lb, &cfg, dir.path("agent.log"))?;
    let run = |bind: &str| -> Result<Value> {
        let out = cgroup.run_python(&topo.client.name, &BOUND_CLIENT.replace("BIND", bind))?;
        out.into_iter().next().context("no output")
    };

    let denied_before = drops(&agent, &topo, "source_denied")?;
    let denied = run(&other_client(Family::V4).to_string())?;
    ensure!(
        denied["error"] == "EPERM",
        "bound to a denied address: {denied}"
    );
    let denied_after = drops(&agent, &topo, "source_denied")?;
    ensure!(
        denied_after > denied_before,
        "the refused connect was not counted"
    );

    let metrics = |name: &str| -> Result<f64> {
        let text = http_get(&topo.lb, agent.listen, "/metrics")?.1;
        Ok(metric(
            &text,
            name,
            &[("service", "web"), ("direction", "to_backend")],
        )
        .unwrap_or(0.0))
    };
    let via_packets = metrics("sluice_service_packets_total")?;
    let allowed = run(&Family::V4.client().to_string())?;
    ensure!(
        allowed["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("b0 10.0.1.2:")),
        "bound to an allowed address: {allowed}"
    );
    ensure!(allowed["peer"][0] == "10.100.0.1", "getpeername: {allowed}");
    ensure!(
        metrics("sluice_service_packets_total")? == via_packets,
        "the allowed bound socket went through the packet path, not the socket hook"
    );

    // Unbound: no source yet at connect(); the packet path checks it.
    let unbound = run("")?;
    ensure!(
        unbound["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("b0 10.0.1.2:")),
        "unbound: {unbound}"
    );
    ensure!(
        metrics("sluice_service_packets_total")? > via_packets,
        "the unbound socket was balanced at the socket, unchecked"
    );
    Ok(())
}
