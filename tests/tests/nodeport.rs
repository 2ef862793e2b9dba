//! NodePorts with real connections: a client connects to the node's own
//! address (the LB namespace's) and the node port, TCP and UDP, IPv4 and
//! IPv6, and lands on backends in other namespaces. Backend 0 is this
//! node's; backend 1 is "another node's": its default route does not go
//! through this node (only a route to the node address does, as another
//! node reaches this one), so its replies come back only if Sluice SNATs
//! to the node address. The backends answer with the peer address they
//! see: with `external_traffic_policy: cluster` backend 0 sees the client,
//! backend 1 the node address; with `local` only backend 0 is used and it
//! sees the client. A refused connect on this node's backend is resent to
//! the other node's at once, across the change to SNAT. The node's own
//! services on other ports of its address are left alone.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use sluice_tests::{Agent, TempDir, http_get, interfaces_yaml, metric};
use testbed::{Family, Topology};

const PORT: u16 = 8080;
const CLUSTER: u16 = 30080;
const LOCAL: u16 = 30081;
const REFUSED: u16 = 30082;
const CLOSED: u16 = 9999;

/// The node address: the LB namespace's address on the clients' side.
fn node(fam: Family) -> IpAddr {
    fam.client_gateway()
}

fn suffix(fam: Family) -> &'static str {
    match fam {
        Family::V4 => "",
        Family::V6 => "6",
    }
}

fn vip(fam: Family, last: u8) -> String {
    match fam {
        Family::V4 => format!("10.100.0.{last}"),
        Family::V6 => format!("fd64::{last}"),
    }
}

fn backend(fam: Family, i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(fam.backend(i), port)
}

/// The services of both families: `web` (TCP) and `dns` (UDP) with the
/// cluster policy, `local` with the local policy, `refused` whose local
/// backend's port is closed.
fn config() -> String {
    let mut text = interfaces_yaml(2);
    text += &format!(
        "node:\n  name: lb-node\n  addresses: [\"{}\", \"{}\"]\nservices:\n",
        node(Family::V4),
        node(Family::V6)
    );
    for fam in [Family::V4, Family::V6] {
        let s = suffix(fam);
        let pair = |local_port: u16| {
            format!(
                "    backends:\n      - {{address: \"{}\", node: lb-node}}\n      - {{address: \"{}\", node: node-b}}\n",
                backend(fam, 0, local_port),
                backend(fam, 1, PORT)
            )
        };
        for (name, last, protocol, node_port, policy, local_port) in [
            ("web", 1, "tcp", CLUSTER, "cluster", PORT),
            ("dns", 1, "udp", CLUSTER, "cluster", PORT),
            ("local", 2, "tcp", LOCAL, "local", PORT),
            ("refused", 3, "tcp", REFUSED, "cluster", CLOSED),
        ] {
            text += &format!(
                "  - name: {name}{s}\n    vip: \"{}\"\n    port: 80\n    protocol: {protocol}\n    node_port: {node_port}\n    external_traffic_policy: {policy}\n    failure: {{min_distinct_clients: 2, consecutive_failures: 1000}}\n",
                vip(fam, last)
            );
            text += &pair(local_port);
        }
    }
    text
}

/// Backend 1 is on "another node": no default route through this one,
/// only a route to the node address.
fn make_backend_remote(topo: &Topology) -> Result<()> {
    let b = &topo.backends[1];
    b.exec(&["ip", "route", "del", "default"])?;
    b.exec(&["ip", "-6", "route", "del", "default"])?;
    for fam in [Family::V4, Family::V6] {
        let host = match fam {
            Family::V4 => format!("{}/32", node(fam)),
            Family::V6 => format!("{}/128", node(fam)),
        };
        let via = fam.backend_gateway(1).to_string();
        b.exec(&["ip", "route", "add", &host, "via", &via])?;
    }
    // Without SNAT its replies to the client have nowhere to go.
    let client = Family::V4.client().to_string();
    if b.exec(&["ip", "route", "get", &client]).is_ok() {
        bail!("backend 1 still has a route to the client");
    }
    Ok(())
}

/// Answers ("bX", peer address seen) of `n` connections to `target`.
fn answers(
    topo: &Topology,
    target: SocketAddr,
    udp: bool,
    n: usize,
) -> Result<Vec<(String, IpAddr)>> {
    topo.client.enter(|| {
        (0..n)
            .map(|i| {
                let text = if udp {
                    testbed::udp_ask(target, 41_000 + i as u16, Duration::from_secs(2))
                } else {
                    testbed::tcp_ask(target, Duration::from_secs(3))
                }
                .with_context(|| format!("connection {i} to {target}"))?;
                let mut words = text.split_whitespace();
                let name = words.next().unwrap_or("").to_string();
                let peer: SocketAddr = words
                    .next()
                    .and_then(|p| p.parse().ok())
                    .with_context(|| format!("answer {text:?} names no peer"))?;
                Ok((name, peer.ip()))
            })
            .collect()
    })?
}

/// `by_backend` for a log line: backend → (answers, distinct peers).
fn summary(got: &BTreeMap<String, Vec<IpAddr>>) -> String {
    got.iter()
        .map(|(b, peers)| {
            let mut distinct = peers.clone();
            distinct.sort();
            distinct.dedup();
            format!("{b}: {} answers, peers {distinct:?}", peers.len())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Answers grouped: backend name → the peer addresses it saw.
fn by_backend(answers: &[(String, IpAddr)]) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (name, peer) in answers {
        out.entry(name.clone()).or_default().push(*peer);
    }
    out
}

#[test]
fn node_ports_reach_backends_on_both_nodes_tcp_and_udp_both_families() -> Result<()> {
    let topo = Topology::new("np", 2)?;
    let mut servers = topo.serve(Family::V4, PORT)?;
    servers.extend(topo.serve(Family::V6, PORT)?);
    make_backend_remote(&topo)?;
    // Neighbour tables left cold, as on a fresh node: the first SYN to a
    // backend is handed to the kernel to resolve, SNATed to the node's own
    // address, which IPv4 forwards only with accept_local (the agent sets
    // it for cluster-policy NodePorts).
    let dir = TempDir::new("np")?;
    let cfg = dir.path("sluice.yaml");
    std::fs::write(&cfg, config())?;
    let agent = Agent::start(&topo.lb, &cfg, dir.path("agent.log"))?;
    // The node's own services on its address (another port) are the
    // node's: untouched by the node ports.
    let own: Vec<testbed::NameServer> = [Family::V4, Family::V6]
        .into_iter()
        .map(|fam| testbed::NameServer::start(&topo.lb, SocketAddr::new(node(fam), 2222), "node"))
        .collect::<Result<_>>()?;

    for fam in [Family::V4, Family::V6] {
        let (client, node) = (fam.client(), node(fam));
        let answer = topo
            .client
            .enter(|| testbed::tcp_ask(SocketAddr::new(node, 2222), Duration::from_secs(3)))??;
        ensure!(
            answer.starts_with("node "),
            "the node's own port 2222: {answer:?}"
        );
        // Cluster: both backends; this node's sees the client, the other
        // node's the node address (SNAT), and its replies come back.
        for udp in [false, true] {
            let target = SocketAddr::new(node, CLUSTER);
            let got = by_backend(&answers(&topo, target, udp, 40)?);
            println!(
                "{fam:?} cluster {}: {}",
                if udp { "udp" } else { "tcp" },
                summary(&got)
            );
            ensure!(
                got.keys().map(String::as_str).eq(["b0", "b1"]),
                "{target} ({}): not both backends: {got:?}",
                if udp { "udp" } else { "tcp" }
            );
            ensure!(
                got["b0"].iter().all(|p| *p == client),
                "b0 saw {:?}",
                got["b0"]
            );
            ensure!(
                got["b1"].iter().all(|p| *p == node),
                "b1 saw {:?}",
                got["b1"]
            );
        }
        // Local: this node's backend only, with the client's address.
        let target = SocketAddr::new(node, LOCAL);
        let got = by_backend(&answers(&topo, target, false, 30)?);
        println!("{fam:?} local: {}", summary(&got));
        ensure!(
            got.keys().map(String::as_str).eq(["b0"]),
            "{target}: {got:?}"
        );
        ensure!(
            got["b0"].iter().all(|p| *p == client),
            "b0 saw {:?}",
            got["b0"]
        );
        // This node's backend refuses: the connect is resent to the other
        // node's at once, now SNATed, and completes.
        let target = SocketAddr::new(node, REFUSED);
        let got = by_backend(&answers(&topo, target, false, 30)?);
        println!("{fam:?} refused on b0: {}", summary(&got));
        ensure!(
            got.keys().map(String::as_str).eq(["b1"]),
            "{target}: {got:?}"
        );
        ensure!(
            got["b1"].iter().all(|p| *p == node),
            "b1 saw {:?}",
            got["b1"]
        );
        let metrics = http_get(&topo.lb, agent.listen, "/metrics")?.1;
        let service = format!("refused{}@{}", suffix(fam), SocketAddr::new(node, REFUSED));
        let retries = metric(
            &metrics,
            "sluice_connection_retries_total",
            &[("service", &service)],
        )
        .with_context(|| format!("no retries series of {service}"))?;
        println!("{service}: {retries} retries");
        ensure!(retries > 0.0, "no connect of {service} was resent to b1");
    }
    drop(own);
    Ok(())
}

/// A Kubernetes Service (namespace `shop`) of `type_` with one TCP port,
/// its nodePort and external traffic policy.
fn kube_service(
    name: &str,
    cluster_ip: &str,
    type_: &str,
    node_port: u16,
    policy: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "labels": {"sluice.io/enabled": "true"}},
        "spec": {"type": type_, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ipFamilies": ["IPv4"], "externalTrafficPolicy": policy,
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                            "targetPort": PORT, "nodePort": node_port}]},
        "status": {"loadBalancer": {}}
    })
}

/// Its EndpointSlice: backend 0 on node-a (this node), backend 1 on node-b.
fn kube_slice(service: &str) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = [(0, "node-a"), (1, "node-b")]
        .iter()
        .map(|(i, node)| {
            serde_json::json!({
                "addresses": [format!("10.1.{i}.2")],
                "nodeName": node,
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("{service}-{i}")}
            })
        })
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

/// Kubernetes `type: NodePort` (Cluster) and `type: LoadBalancer` (Local)
/// Services through the mock API server: their nodePorts on this node's
/// addresses (found on the host, not configured), real connections.
#[test]
fn kubernetes_node_ports_honour_the_external_traffic_policy() -> Result<()> {
    const API: &str = "127.0.0.1:8001";
    let topo = Topology::new("npk", 2)?;
    let _servers = topo.serve(Family::V4, PORT)?;
    make_backend_remote(&topo)?;
    let api = sluice_tests::kube_mock::KubeMock::start(&topo.lb, API.parse()?)?;
    api.apply(kube_service(
        "np",
        "10.100.0.5",
        "NodePort",
        30090,
        "Cluster",
    ));
    api.apply(kube_slice("np"));
    api.apply(kube_service(
        "lb",
        "10.100.0.6",
        "LoadBalancer",
        30091,
        "Local",
    ));
    api.apply(kube_slice("lb"));

    let dir = TempDir::new("npk")?;
    let config = interfaces_yaml(2)
        + &format!(
            "kubernetes:\n  api_server: http://{API}\n  node_name: node-a\n  addresses: [cluster_ip, node_ports]\n"
        );
    std::fs::write(dir.path("sluice.yaml"), config)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    let (client, node) = (Family::V4.client(), node(Family::V4));
    let cluster = SocketAddr::new(node, 30090);
    sluice_tests::wait_for("the node port", Duration::from_secs(15), || {
        Ok(topo
            .client
            .enter(|| testbed::tcp_ask(cluster, Duration::from_secs(1)))?
            .is_ok())
    })
    .with_context(|| agent.log_text())?;

    let got = by_backend(&answers(&topo, cluster, false, 40)?);
    println!("kubernetes Cluster {cluster}: {}", summary(&got));
    ensure!(got.keys().map(String::as_str).eq(["b0", "b1"]), "{got:?}");
    ensure!(
        got["b0"].iter().all(|p| *p == client),
        "b0 saw {:?}",
        got["b0"]
    );
    ensure!(
        got["b1"].iter().all(|p| *p == node),
        "b1 saw {:?}",
        got["b1"]
    );

    let local = SocketAddr::new(node, 30091);
    let got = by_backend(&answers(&topo, local, false, 30)?);
    println!("kubernetes Local {local}: {}", summary(&got));
    ensure!(got.keys().map(String::as_str).eq(["b0"]), "{got:?}");
    ensure!(
        got["b0"].iter().all(|p| *p == client),
        "b0 saw {:?}",
        got["b0"]
    );

    // The entries are named after the Service, port and node address.
    let listed = sluice_tests::services_json(&topo.lb, &agent)?;
    let names: Vec<&str> = listed["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    ensure!(
        names.contains(&"shop/np:http@10.0.1.1:30090")
            && names.contains(&"shop/lb:http@10.0.1.1:30091"),
        "{names:?}"
    );
    Ok(())
}

/// Entries of `/api/v1/services` whose name starts with `prefix`.
fn entries(topo: &Topology, agent: &Agent, prefix: &str) -> Result<Vec<String>> {
    let listed = sluice_tests::services_json(&topo.lb, agent)?;
    Ok(listed["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// With no `node.addresses`, the node ports are on the host's addresses
/// (not loopback, not link-local), and follow an address added to or
/// removed from an interface.
#[test]
fn default_node_addresses_follow_the_hosts_addresses() -> Result<()> {
    let topo = Topology::new("npa", 1)?;
    let _servers = topo.serve(Family::V4, PORT)?;
    topo.warm_neighbours()?;
    let dir = TempDir::new("npa")?;
    let cfg = dir.path("sluice.yaml");
    let config = interfaces_yaml(1)
        + &format!(
            "node: {{name: lb-node}}\nservices:\n  - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    node_port: {CLUSTER}\n    backends:\n      - {{address: \"{}\", node: lb-node}}\n",
            backend(Family::V4, 0, PORT)
        );
    std::fs::write(&cfg, config)?;
    let agent = Agent::start(&topo.lb, &cfg, dir.path("agent.log"))?;

    // Every IPv4 address of the LB namespace's interfaces but loopback.
    let mut listed = entries(&topo, &agent, "web@")?;
    listed.sort();
    ensure!(
        listed == ["web@10.0.1.1:30080", "web@10.1.0.1:30080"],
        "{listed:?}"
    );
    let answer = topo.client.enter(|| {
        testbed::tcp_ask(
            SocketAddr::new(node(Family::V4), CLUSTER),
            Duration::from_secs(3),
        )
    })??;
    ensure!(answer.starts_with("b0 10.0.1.2:"), "{answer:?}");

    // A new address on the clients' side: a node port there too.
    topo.lb
        .exec(&["ip", "addr", "add", "10.0.1.100/24", "dev", "front"])?;
    let added: SocketAddr = "10.0.1.100:30080".parse()?;
    sluice_tests::wait_for(
        "the node port on the new address",
        Duration::from_secs(10),
        || {
            Ok(topo
                .client
                .enter(|| testbed::tcp_ask(added, Duration::from_secs(1)))?
                .is_ok())
        },
    )
    .with_context(|| agent.log_text())?;
    ensure!(entries(&topo, &agent, "web@10.0.1.100:")?.len() == 1);
    // Removed again: so is its entry.
    topo.lb
        .exec(&["ip", "addr", "del", "10.0.1.100/24", "dev", "front"])?;
    sluice_tests::wait_for("the entry gone", Duration::from_secs(10), || {
        Ok(entries(&topo, &agent, "web@10.0.1.100:")?.is_empty())
    })?;
    Ok(())
}
