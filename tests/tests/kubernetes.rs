//! The Kubernetes provider against a mock API server that speaks the real
//! list/watch protocol (tests/src/kube_mock.rs): an opted-in Service and its
//! EndpointSlices become a Sluice service whose traffic really flows;
//! endpoint conditions drive active/draining/removed; weights come from the
//! annotation; a 410 Gone makes the watcher relist; an API server that
//! disappears leaves everything serving, and its return is picked up.
//! Traffic policies and topology hints choose the endpoints a VIP uses.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sluice_tests::{
    Agent, Bpffs, TempDir, backend_states, http_get, kube_mock::KubeMock, wait_for,
};
use testbed::{Family, Topology};

const SERVICE: &str = "shop/web:http";
const API: &str = "127.0.0.1:8001";

fn service(name: &str, ip: &str, opted_in: bool, weights: Option<&str>) -> Value {
    let mut labels = json!({"app": name});
    if opted_in {
        labels["sluice.io/enabled"] = json!("true");
    }
    let mut annotations = json!({});
    if let Some(w) = weights {
        annotations["sluice.io/weights"] = json!(w);
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "labels": labels, "annotations": annotations},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {}}
    })
}

/// (backend index, ready, serving, terminating)
fn slice(endpoints: &[(usize, bool, bool, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|&(i, ready, serving, terminating)| {
            json!({
                "addresses": [format!("10.1.{i}.2")],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("web-{i}")}
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abcde", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web",
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn states(topo: &Topology, agent: &Agent) -> Result<BTreeMap<String, String>> {
    backend_states(&topo.lb, agent, SERVICE)
}

fn want(pairs: &[(usize, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(i, s)| (format!("10.1.{i}.2:8080"), s.to_string()))
        .collect()
}

fn wait_states(topo: &Topology, agent: &Agent, pairs: &[(usize, &str)]) -> Result<()> {
    let want = want(pairs);
    wait_for(
        &format!("{SERVICE} = {want:?}"),
        Duration::from_secs(15),
        || Ok(states(topo, agent).unwrap_or_default() == want),
    )
    .with_context(|| {
        format!(
            "now {:?}\n{}",
            states(topo, agent).unwrap_or_default(),
            agent.log_text()
        )
    })
}

/// Backends reached by `n` new connections to the ClusterIP.
fn reached(topo: &Topology, n: usize) -> Result<BTreeSet<String>> {
    sluice_tests::backends_reached(topo, "10.100.0.1:80".parse()?, n)
}

fn names(items: &[usize]) -> BTreeSet<String> {
    items.iter().map(|i| format!("b{i}")).collect()
}

fn healthy(topo: &Topology, agent: &Agent) -> Result<bool> {
    let (_, metrics) = http_get(&topo.lb, agent.listen, "/metrics")?;
    Ok(sluice_tests::metric(
        &metrics,
        "sluice_discovery_healthy",
        &[("service", SERVICE), ("provider", "kubernetes")],
    ) == Some(1.0))
}

#[test]
fn endpointslices_drive_the_maps_through_watch_expiry_and_an_api_outage() -> Result<()> {
    let topo = Topology::new("k8s", 3)?;
    let _servers = topo.serve(Family::V4, 8080)?;
    topo.warm_neighbours()?;
    let mut api = KubeMock::start(&topo.lb, API.parse()?)?;
    api.apply(service("web", "10.100.0.1", true, None));
    // Not opted in: must be left alone.
    api.apply(service("other", "10.100.0.9", false, None));
    api.apply(slice(&[(0, true, true, false), (1, true, true, false)]));

    let dir = TempDir::new("k8s")?;
    let bpffs = Bpffs::mount(&dir)?;
    let mut config = sluice_tests::interfaces_yaml(3);
    config += &format!(
        "kubernetes:\n  api_server: http://{API}\n  drain_timeout_seconds: 30\npinning:\n  directory: {}\n",
        bpffs.0.join("k8s").display()
    );
    std::fs::write(dir.path("sluice.yaml"), config)?;
    let mut agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    // Initial list: the opted-in Service only, its ready endpoints active.
    wait_states(&topo, &agent, &[(0, "active"), (1, "active")])?;
    let all = sluice_tests::services_json(&topo.lb, &agent)?;
    let names_listed: Vec<&str> = all["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names_listed, [SERVICE], "only the opted-in Service");
    assert_eq!(reached(&topo, 60)?, names(&[0, 1]), "the maps carry it");

    // Updates: a new ready endpoint; one terminating but still serving.
    api.apply(slice(&[
        (0, false, true, true),
        (1, true, true, false),
        (2, true, true, false),
    ]));
    wait_states(
        &topo,
        &agent,
        &[(0, "draining"), (1, "active"), (2, "active")],
    )?;
    assert_eq!(reached(&topo, 60)?, names(&[1, 2]));

    // Gone from the slice: removed (it had no connections left to drain).
    api.apply(slice(&[(1, true, true, false), (2, true, true, false)]));
    wait_states(&topo, &agent, &[(1, "active"), (2, "active")])?;

    // Weights from the annotation (by address and by pod name).
    api.apply(service(
        "web",
        "10.100.0.1",
        true,
        Some("10.1.1.2=3, web-2=2"),
    ));
    wait_for("weights applied", Duration::from_secs(15), || {
        let s = sluice_tests::service_json(&topo.lb, &agent, SERVICE)?;
        let w: BTreeMap<String, u64> = s["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["address"].as_str().unwrap_or("").to_string(),
                    b["weight"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        Ok(w.get("10.1.1.2:8080") == Some(&3) && w.get("10.1.2.2:8080") == Some(&2))
    })?;

    // The watch expires (410 Gone): the watcher lists again and sees a
    // change made meanwhile.
    api.expire_watches();
    api.apply(slice(&[
        (0, true, true, false),
        (1, true, true, false),
        (2, true, true, false),
    ]));
    wait_states(
        &topo,
        &agent,
        &[(0, "active"), (1, "active"), (2, "active")],
    )?;
    assert_eq!(reached(&topo, 90)?, names(&[0, 1, 2]));
    let log = agent.log_text();
    assert!(
        log.contains("too old resource version"),
        "the watch did not see 410 Gone:\n{log}"
    );

    // The API server disappears: everything keeps serving, the provider is
    // unhealthy.
    api.stop();
    wait_for("provider unhealthy", Duration::from_secs(30), || {
        Ok(!healthy(&topo, &agent)?)
    })?;
    assert_eq!(
        states(&topo, &agent)?,
        want(&[(0, "active"), (1, "active"), (2, "active")])
    );
    assert_eq!(reached(&topo, 60)?, names(&[0, 1, 2]));

    // It comes back (with a change made while it was away): picked up.
    api.apply(slice(&[(1, true, true, false), (2, true, true, false)]));
    api.resume(&topo.lb)?;
    wait_states(
        &topo,
        &agent,
        &[(0, "draining"), (1, "active"), (2, "active")],
    )
    .or_else(|_| wait_states(&topo, &agent, &[(1, "active"), (2, "active")]))?;
    wait_for("provider healthy again", Duration::from_secs(30), || {
        healthy(&topo, &agent)
    })?;

    // A restart while the API server is away: the pinned Kubernetes
    // services keep serving (adopted) until the provider answers, then
    // carry on under their names.
    wait_states(&topo, &agent, &[(1, "active"), (2, "active")])?;
    agent.kill9()?;
    api.stop();
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent2.log"))?;
    assert_eq!(
        reached(&topo, 60)?,
        names(&[1, 2]),
        "served while the API is away"
    );
    api.resume(&topo.lb)?;
    wait_states(&topo, &agent, &[(1, "active"), (2, "active")])?;
    let log = agent.log_text();
    assert!(
        log.contains("service renamed"),
        "the adopted service was not taken over by name:\n{log}"
    );
    assert_eq!(reached(&topo, 60)?, names(&[1, 2]));

    // The Service is deleted: its Sluice service goes.
    api.delete("Service", "shop", "web");
    wait_for("service removed", Duration::from_secs(15), || {
        let all = sluice_tests::services_json(&topo.lb, &agent)?;
        Ok(all["services"].as_array().is_none_or(|s| s.is_empty()))
    })?;
    Ok(())
}

/// An EndpointSlice of `name` whose endpoints are (backend index, node,
/// ready, zone hint).
fn placed_slice(name: &str, endpoints: &[(usize, &str, bool, Option<&str>)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|&(i, node, ready, zone)| {
            let mut e = json!({
                "addresses": [format!("10.1.{i}.2")],
                "nodeName": node,
                "conditions": {"ready": ready, "serving": true, "terminating": !ready},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("{name}-{i}")}
            });
            if let Some(zone) = zone {
                e["zone"] = json!(zone);
                e["hints"] = json!({"forZones": [{"name": zone}]});
            }
            e
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-abcde"), "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

/// `internalTrafficPolicy: Local` keeps this node's endpoints (falling back
/// to its serving terminating ones when none is ready), and zone hints keep
/// a Cluster Service's traffic in this node's zone: checked by where real
/// connections land.
#[test]
fn traffic_policy_and_topology_hints_choose_the_endpoints() -> Result<()> {
    let topo = Topology::new("k8sl", 3)?;
    let _servers = topo.serve(Family::V4, 8080)?;
    topo.warm_neighbours()?;
    let api = KubeMock::start(&topo.lb, API.parse()?)?;
    let mut local = service("local", "10.100.0.2", true, None);
    local["spec"]["internalTrafficPolicy"] = json!("Local");
    api.apply(local);
    api.apply(placed_slice(
        "local",
        &[
            (0, "node-a", true, None),
            (1, "node-b", true, None),
            (2, "node-a", true, None),
        ],
    ));
    api.apply(service("zoned", "10.100.0.3", true, None));
    api.apply(placed_slice(
        "zoned",
        &[
            (0, "node-c", true, Some("zone-b")),
            (1, "node-b", true, Some("zone-a")),
            (2, "node-d", true, Some("zone-b")),
        ],
    ));

    let dir = TempDir::new("k8sl")?;
    let mut config = sluice_tests::interfaces_yaml(3);
    config +=
        &format!("kubernetes:\n  api_server: http://{API}\n  node_name: node-a\n  zone: zone-a\n");
    std::fs::write(dir.path("sluice.yaml"), &config)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    let local_vip = "10.100.0.2:80".parse()?;
    let zoned_vip = "10.100.0.3:80".parse()?;
    let wait_reached = |vip, want: &[usize]| {
        let want = names(want);
        wait_for(
            &format!("{vip} reaches {want:?}"),
            Duration::from_secs(15),
            || Ok(sluice_tests::backends_reached(&topo, vip, 30).unwrap_or_default() == want),
        )
        .with_context(|| agent.log_text())
    };

    // Local: node-a's endpoints only, never node-b's.
    wait_reached(local_vip, &[0, 2])?;
    // Cluster with complete zone hints: the one hinted for zone-a.
    wait_reached(zoned_vip, &[1])?;

    // node-a's endpoints are terminating (still serving) while node-b's is
    // ready: they take new connections rather than the Local VIP
    // dropping them, and node-b's still gets none.
    api.apply(placed_slice(
        "local",
        &[
            (0, "node-a", false, None),
            (1, "node-b", true, None),
            (2, "node-a", false, None),
        ],
    ));
    wait_for(
        "terminating endpoints serving",
        Duration::from_secs(15),
        || {
            let s = sluice_tests::service_json(&topo.lb, &agent, "shop/local:http")?;
            Ok(s["backends"].as_array().is_some_and(|b| {
                b.iter().all(|b| b["state"] == "active" && b["weight"] == 1) && b.len() == 2
            }))
        },
    )?;
    assert_eq!(
        sluice_tests::backends_reached(&topo, local_vip, 30)?,
        names(&[0, 2])
    );

    // A hint-less endpoint joins the zoned slice: hints no longer apply.
    api.apply(placed_slice(
        "zoned",
        &[
            (0, "node-c", true, None),
            (1, "node-b", true, Some("zone-a")),
            (2, "node-d", true, Some("zone-b")),
        ],
    ));
    wait_reached(zoned_vip, &[0, 1, 2])?;
    Ok(())
}

// ------------------------------------------------------------ trust

/// An opted-in Service `ns/name` at ClusterIP `ip` with these TCP ports
/// (name, port; the target port is the slice's) and externalIPs.
fn tenant_service(
    ns: &str,
    name: &str,
    ip: &str,
    ports: &[(String, u16)],
    external: &[&str],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP", "targetPort": 8080}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"app": name, "sluice.io/enabled": "true"}},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                 "externalIPs": external, "ports": ports},
        "status": {"loadBalancer": {}}
    })
}

/// The EndpointSlice of `ns/service`: every port name on 8080, these
/// endpoint addresses (ready).
fn tenant_slice(ns: &str, service: &str, ports: &[(String, u16)], addresses: &[&str]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, _)| json!({"name": n, "port": 8080, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<Value> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            json!({"addresses": [a], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "namespace": ns, "name": format!("{service}-{i}")}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints
    })
}

fn http_port() -> Vec<(String, u16)> {
    vec![("http".to_string(), 80)]
}

/// The names `/api/v1/services` lists.
fn listed(topo: &Topology, agent: &Agent) -> Result<BTreeSet<String>> {
    let all = sluice_tests::services_json(&topo.lb, agent)?;
    Ok(all["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect())
}

fn wait_listed(topo: &Topology, agent: &Agent, want: &[&str]) -> Result<()> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(
        &format!("services {want:?}"),
        Duration::from_secs(20),
        || Ok(listed(topo, agent).unwrap_or_default() == want),
    )
    .with_context(|| {
        format!(
            "listed {:?}\n{}",
            listed(topo, agent).unwrap_or_default(),
            agent.log_text()
        )
    })
}

/// With `namespaces` set, a Service labelled in any other namespace is
/// ignored (and logged), however it is labelled; the listed namespaces'
/// Services (each watched on its own) serve.
#[test]
fn services_of_namespaces_not_listed_are_ignored() -> Result<()> {
    let topo = Topology::new("k8sns", 3)?;
    let _servers = topo.serve(Family::V4, 8080)?;
    topo.warm_neighbours()?;
    let api = KubeMock::start(&topo.lb, API.parse()?)?;
    api.apply(tenant_service(
        "shop",
        "web",
        "10.100.0.1",
        &http_port(),
        &[],
    ));
    api.apply(tenant_slice("shop", "web", &http_port(), &["10.1.0.2"]));
    api.apply(tenant_service(
        "media",
        "cdn",
        "10.100.0.2",
        &http_port(),
        &[],
    ));
    api.apply(tenant_slice("media", "cdn", &http_port(), &["10.1.1.2"]));
    // A tenant opts in from a namespace nobody listed.
    api.apply(tenant_service(
        "tenant",
        "grab",
        "10.100.0.3",
        &http_port(),
        &[],
    ));
    api.apply(tenant_slice("tenant", "grab", &http_port(), &["10.1.2.2"]));

    let dir = TempDir::new("k8sns")?;
    let config = sluice_tests::interfaces_yaml(3)
        + &format!("kubernetes:\n  api_server: http://{API}\n  namespaces: [shop, media]\n");
    std::fs::write(dir.path("sluice.yaml"), config)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    wait_listed(&topo, &agent, &["shop/web:http", "media/cdn:http"])?;
    assert_eq!(reached(&topo, 20)?, names(&[0]));
    assert_eq!(
        sluice_tests::backends_reached(&topo, "10.100.0.2:80".parse()?, 20)?,
        names(&[1])
    );
    // Only the listed namespaces are even watched: the tenant's Service
    // never reaches the agent.
    let log = agent.log_text();
    assert!(!log.contains("tenant/grab"), "{log}");
    let grabbed = topo
        .client
        .enter(|| testbed::tcp_ask("10.100.0.3:80".parse().unwrap(), Duration::from_secs(1)))?;
    assert!(
        grabbed.is_err(),
        "the tenant's VIP was balanced: {grabbed:?}"
    );

    // A change in a listed namespace still applies.
    api.apply(tenant_slice(
        "shop",
        "web",
        &http_port(),
        &["10.1.0.2", "10.1.2.2"],
    ));
    wait_states(&topo, &agent, &[(0, "active"), (2, "active")])?;
    assert_eq!(listed(&topo, &agent)?.len(), 2);
    Ok(())
}

/// A Service with 65 ports needs 65 service slots of the 64 the maps have:
/// it is quarantined (log, metric, /readyz) while another Service's
/// endpoint change still applies; once it is gone, so is the quarantine.
#[test]
fn a_service_that_does_not_fit_is_quarantined_and_others_keep_updating() -> Result<()> {
    let topo = Topology::new("k8sq", 3)?;
    let _servers = topo.serve(Family::V4, 8080)?;
    topo.warm_neighbours()?;
    let api = KubeMock::start(&topo.lb, API.parse()?)?;
    api.apply(tenant_service(
        "shop",
        "web",
        "10.100.0.1",
        &http_port(),
        &[],
    ));
    api.apply(tenant_slice(
        "shop",
        "web",
        &http_port(),
        &["10.1.0.2", "10.1.1.2"],
    ));

    let dir = TempDir::new("k8sq")?;
    let config = sluice_tests::interfaces_yaml(3)
        + &format!("kubernetes:\n  api_server: http://{API}\nlimits:\n  max_services: 64\n");
    std::fs::write(dir.path("sluice.yaml"), config)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    wait_states(&topo, &agent, &[(0, "active"), (1, "active")])?;

    // 65 ports, over limits.max_services (64).
    let ports: Vec<(String, u16)> = (1..=65).map(|i| (format!("p{i}"), 1000 + i)).collect();
    api.apply(tenant_service("tenant", "big", "10.100.0.9", &ports, &[]));
    api.apply(tenant_slice("tenant", "big", &ports, &["10.1.2.2"]));
    // Another Service's endpoints change (after the big one came): applied,
    // and traffic follows.
    api.apply(tenant_slice(
        "shop",
        "web",
        &http_port(),
        &["10.1.1.2", "10.1.2.2"],
    ));
    wait_states(&topo, &agent, &[(1, "active"), (2, "active")]).or_else(|_| {
        wait_states(
            &topo,
            &agent,
            &[(0, "draining"), (1, "active"), (2, "active")],
        )
    })?;
    assert_eq!(reached(&topo, 60)?, names(&[1, 2]));
    assert_eq!(
        listed(&topo, &agent)?.len(),
        1,
        "nothing of tenant/big is in the maps"
    );

    let quarantined = |agent: &Agent| -> Result<Option<f64>> {
        let (_, metrics) = http_get(&topo.lb, agent.listen, "/metrics")?;
        Ok(sluice_tests::metric(
            &metrics,
            "sluice_discovery_quarantined_services",
            &[("provider", "kubernetes")],
        ))
    };
    wait_for("quarantined", Duration::from_secs(15), || {
        Ok(quarantined(&agent)? == Some(1.0))
    })
    .with_context(|| agent.log_text())?;

    let (status, body) = http_get(&topo.lb, agent.listen, "/readyz")?;
    assert_eq!(status, 200);
    assert!(
        body.contains("service tenant/big: kubernetes: quarantined: needs 65 service slots"),
        "/readyz names it: {body}"
    );
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("event=\"quarantined\"") && l.contains("tenant/big")),
        "no quarantine event logged:\n{log}"
    );
    assert!(!log.contains("discovered backends not applied"), "{log}");

    // The Service goes: released.
    api.delete("Service", "tenant", "big");
    wait_for("released", Duration::from_secs(15), || {
        Ok(quarantined(&agent)? == Some(0.0))
    })?;
    let (_, body) = http_get(&topo.lb, agent.listen, "/readyz")?;
    assert!(!body.contains("tenant/big"), "{body}");
    Ok(())
}

/// With `external_ips` on, a Service can't claim this node's addresses or
/// a metadata address as a VIP, nor name loopback or metadata endpoints;
/// with `external_cidrs` set, only addresses inside them. The rest of the
/// Service serves.
#[test]
fn claimed_addresses_are_refused_and_the_rest_serves() -> Result<()> {
    let topo = Topology::new("k8sx", 3)?;
    let _servers = topo.serve(Family::V4, 8080)?;
    topo.warm_neighbours()?;
    let api = KubeMock::start(&topo.lb, API.parse()?)?;
    // 10.0.1.1 is the LB node's own address (its client-side interface).
    let external = ["10.100.0.20", "10.0.1.1", "169.254.169.254", "198.51.100.7"];
    api.apply(tenant_service(
        "shop",
        "web",
        "10.100.0.1",
        &http_port(),
        &external,
    ));
    api.apply(tenant_slice(
        "shop",
        "web",
        &http_port(),
        &["10.1.0.2", "127.0.0.1", "169.254.169.254", "10.1.1.2"],
    ));

    let dir = TempDir::new("k8sx")?;
    let base = sluice_tests::interfaces_yaml(3)
        + &format!(
            "kubernetes:\n  api_server: http://{API}\n  addresses: [cluster_ip, external_ips]\n"
        );
    std::fs::write(dir.path("sluice.yaml"), &base)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    // No allow-list: any external address but the never-taken ones.
    wait_listed(
        &topo,
        &agent,
        &[
            "shop/web:http",
            "shop/web:http@10.100.0.20",
            "shop/web:http@198.51.100.7",
        ],
    )?;
    wait_states(&topo, &agent, &[(0, "active"), (1, "active")])?;
    assert_eq!(
        sluice_tests::backends_reached(&topo, "10.100.0.20:80".parse()?, 30)?,
        names(&[0, 1])
    );
    let log = agent.log_text();
    for refused in [
        "externalIP 10.0.1.1\" why=\"this node's address (on front) can't be a VIP\"",
        "externalIP 169.254.169.254\" why=\"a cloud metadata address can't be a VIP\"",
        "why=\"backend 127.0.0.1:8080: a loopback address can't be a backend\"",
        "why=\"backend 169.254.169.254:8080: a cloud metadata address can't be a backend\"",
    ] {
        assert!(log.contains(refused), "not logged: {refused}\n{log}");
    }
    // The node's own address is not hijacked: the LB's kernel answers
    // (nothing listens on port 80 there), not a backend.
    let node = topo
        .client
        .enter(|| testbed::tcp_ask("10.0.1.1:80".parse().unwrap(), Duration::from_secs(1)))?;
    assert!(node.is_err(), "the node's address was balanced: {node:?}");

    // An allow-list: only addresses inside it (never the node's, even
    // inside a listed block).
    std::fs::write(
        dir.path("sluice.yaml"),
        base + "  external_cidrs: [10.0.0.0/8, 169.254.0.0/16]\n",
    )?;
    agent.reload()?;
    wait_listed(
        &topo,
        &agent,
        &["shop/web:http", "shop/web:http@10.100.0.20"],
    )?;
    assert!(
        agent
            .log_text()
            .contains("externalIP 198.51.100.7\" why=\"not inside kubernetes.external_cidrs\""),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        sluice_tests::backends_reached(&topo, "10.100.0.20:80".parse()?, 30)?,
        names(&[0, 1])
    );
    Ok(())
}

/// The per-backend series of `backend`: (metric name, labels text).
fn backend_series(scrape: &str, backend: &str) -> Vec<(String, String)> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, rest) = l.split_once('{')?;
            let (labels, _) = rest.split_once('}')?;
            labels
                .contains(&format!("backend=\"{backend}\""))
                .then(|| (name.to_string(), labels.to_string()))
        })
        .collect()
}

#[test]
fn kubernetes_backends_carry_their_pods_namespace_and_name() -> Result<()> {
    let topo = Topology::new("k8sp", 2)?;
    let _servers = topo.serve(Family::V4, 8080)?;
    topo.warm_neighbours()?;
    let api = KubeMock::start(&topo.lb, API.parse()?)?;
    api.apply(service("web", "10.100.0.1", true, None));
    api.apply(slice(&[(0, true, true, false), (1, true, true, false)]));

    let dir = TempDir::new("k8sp")?;
    // A backend from the file next to the Kubernetes ones.
    let config = sluice_tests::interfaces_yaml(2)
        + &format!("kubernetes:\n  api_server: http://{API}\n")
        + "services:\n  - name: static\n    vip: 10.100.0.5\n    port: 80\n    protocol: tcp\n    backends:\n      - address: 10.1.1.2:9090\n";
    std::fs::write(dir.path("sluice.yaml"), config)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    wait_states(&topo, &agent, &[(0, "active"), (1, "active")])?;
    assert_eq!(reached(&topo, 40)?, names(&[0, 1]));

    // Every series of a Kubernetes backend names its pod; with traffic.
    let scrape = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    let pod_labels = ",namespace=\"shop\",pod=\"web-0\"";
    let series = backend_series(&scrape, "10.1.0.2:8080");
    assert_eq!(series.len(), 36, "{series:#?}");
    for (name, labels) in &series {
        assert!(
            labels.starts_with(&format!(
                "service=\"{SERVICE}\",backend=\"10.1.0.2:8080\"{pod_labels}"
            )),
            "{name}{{{labels}}}"
        );
    }
    let connections = sluice_tests::metric(
        &scrape,
        "sluice_backend_connections_total",
        &[("namespace", "shop"), ("pod", "web-0")],
    );
    assert!(connections.is_some_and(|n| n > 0.0), "{connections:?}");
    // A file backend: no pod labels, as before.
    let file = backend_series(&scrape, "10.1.1.2:9090");
    assert_eq!(file.len(), 36);
    assert!(
        file.iter()
            .all(|(_, l)| !l.contains("namespace=") && !l.contains("pod=")),
        "{file:#?}"
    );
    // And the API says the same.
    let web = sluice_tests::service_json(&topo.lb, &agent, SERVICE)?;
    let pods: BTreeMap<String, (String, String)> = web["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let text = |k: &str| b[k].as_str().unwrap_or("").to_string();
            (text("address"), (text("namespace"), text("pod")))
        })
        .collect();
    let pod = |name: &str| ("shop".to_string(), name.to_string());
    assert_eq!(
        pods,
        BTreeMap::from([
            ("10.1.0.2:8080".to_string(), pod("web-0")),
            ("10.1.1.2:8080".to_string(), pod("web-1")),
        ])
    );
    let file = sluice_tests::service_json(&topo.lb, &agent, "static")?;
    let file_backend = &file["backends"][0];
    assert!(file_backend.get("pod").is_none() && file_backend.get("namespace").is_none());

    // A terminating pod drains under its name.
    api.apply(slice(&[(0, false, true, true), (1, true, true, false)]));
    wait_states(&topo, &agent, &[(0, "draining"), (1, "active")])?;
    let scrape = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    assert_eq!(
        sluice_tests::metric(
            &scrape,
            "sluice_backend_state",
            &[("pod", "web-0"), ("state", "draining")]
        ),
        Some(1.0)
    );

    // The Service's annotation turns its latency histogram off, live; the
    // file service keeps its own.
    let mut annotated = service("web", "10.100.0.1", true, None);
    annotated["metadata"]["annotations"]["sluice.io/backend-latency-histogram"] = json!("false");
    api.apply(annotated);
    wait_for(
        "the histogram off by annotation",
        Duration::from_secs(15),
        || {
            let scrape = http_get(&topo.lb, agent.listen, "/metrics")?.1;
            Ok(backend_series(&scrape, "10.1.0.2:8080").len() == 13)
        },
    )?;
    let scrape = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    assert!(
        backend_series(&scrape, "10.1.0.2:8080")
            .iter()
            .all(|(name, _)| !name.starts_with("sluice_backend_connect_latency")),
    );
    assert_eq!(backend_series(&scrape, "10.1.1.2:9090").len(), 36);
    Ok(())
}
