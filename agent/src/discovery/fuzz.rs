//! The discovery decoders under proptest (`cargo xtask fuzz config` runs
//! them longer): etcd watch messages and key values, Kubernetes Services and
//! EndpointSlices as JSON. Whatever arrives, nothing panics, an unusable
//! etcd value is refused naming its key, and what comes out is usable:
//! backends of the VIP's family with weights in range.

use std::{collections::BTreeMap, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::{
    DiscoveryError,
    etcd::{Snapshot, apply_watch_message, backends},
    kubernetes::{Locality, Trust, desired},
};
use crate::config::MAX_WEIGHT;

/// Keys the decoders look for, so generated objects reach their branches.
const KEYS: &[&str] = &[
    "result",
    "events",
    "kv",
    "key",
    "value",
    "type",
    "header",
    "revision",
    "mod_revision",
    "compact_revision",
    "canceled",
    "cancel_reason",
    "created",
    "error",
    "address",
    "weight",
    "metadata",
    "name",
    "namespace",
    "labels",
    "annotations",
    "spec",
    "ports",
    "port",
    "protocol",
    "clusterIP",
    "clusterIPs",
    "externalIPs",
    "addressType",
    "endpoints",
    "addresses",
    "conditions",
    "ready",
    "serving",
    "terminating",
    "nodeName",
    "zone",
    "hints",
    "forZones",
    "forNodes",
    "targetRef",
    "status",
    "loadBalancer",
    "ingress",
    "ip",
    "internalTrafficPolicy",
    "externalTrafficPolicy",
];

/// Scalars of every JSON kind, with the strings these decoders expect.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        proptest::sample::select(&[
            "10.0.0.1",
            "fd00::1",
            "10.0.0.1:80",
            "[fd00::1]:80",
            "web:80",
            "None",
            "TCP",
            "UDP",
            "SCTP",
            "IPv4",
            "IPv6",
            "FQDN",
            "DELETE",
            "PUT",
            "Local",
            "Cluster",
            "7",
            "-1",
            "99999999999999999999",
            "",
            "node-1",
            "zone-a",
            "sluice.io/weights",
            "10.0.0.1=3, pod-a=0, x=",
            "kubernetes.io/service-name",
        ])
        .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(KEYS), inner), 0..6).prop_map(
                |fields| Value::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect()
                )
            ),
        ]
    })
}

/// A valid etcd watch message putting `value` at `key`, then changed in
/// one place by `at`/`to`.
fn watch_message(key: &[u8], value: &[u8]) -> Value {
    json!({"result": {"header": {"revision": "9"}, "events": [{"kv": {
        "key": STANDARD.encode(key), "value": STANDARD.encode(value), "mod_revision": "9"}}]}})
}

/// Replaces the value at a path chosen by `pick` with `to`: at each level
/// `pick` says whether to stop here or which member to go into.
fn spoil(value: &mut Value, pick: usize, to: Value) {
    let deeper = !pick.is_multiple_of(3);
    let next = match value {
        Value::Object(map) if deeper && !map.is_empty() => {
            let i = pick % map.len();
            map.values_mut().nth(i)
        }
        Value::Array(items) if deeper && !items.is_empty() => {
            let i = pick % items.len();
            items.get_mut(i)
        }
        _ => None,
    };
    match next {
        Some(member) => spoil(member, pick / 3, to),
        None => *value = to,
    }
}

fn backend_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(br#"{"address": "10.0.0.1:80", "weight": 3}"#.to_vec()),
        Just(br#"{"address": "[fd00::1]:80"}"#.to_vec()),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

fn check_backends(snap: &Snapshot) -> Result<(), TestCaseError> {
    match backends(snap) {
        Ok(found) => prop_assert_eq!(found.len(), snap.values.len()),
        Err(e @ (DiscoveryError::EtcdValue { .. } | DiscoveryError::EtcdAddress { .. })) => {
            let text = e.to_string();
            prop_assert!(text.starts_with("key "), "{}", text);
        }
        Err(e) => prop_assert!(false, "unexpected error kind: {}", e),
    }
    Ok(())
}

/// A Service and its EndpointSlice that `desired` turns into backends.
fn kubernetes_pair() -> (Value, Value) {
    let svc = json!({
        "metadata": {"name": "web", "namespace": "default",
                     "annotations": {"sluice.io/weights": "10.1.0.2=3"}},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd96::10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    });
    let slice = json!({
        "metadata": {"name": "web-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "nodeName": "node-1"},
            {"addresses": ["10.1.0.3"], "conditions": {"ready": false, "serving": true,
                                                       "terminating": true}},
        ],
    });
    (svc, slice)
}

fn check_kubernetes(svc: Value, slice: Value) -> Result<(), TestCaseError> {
    // What the API would refuse to decode, kube's watcher reports; what it
    // decodes reaches `desired`.
    let (Ok(svc), Ok(slice)) = (
        serde_json::from_value::<Service>(svc),
        serde_json::from_value::<EndpointSlice>(slice),
    ) else {
        return Ok(());
    };
    let spec = crate::config::parse(
        "interfaces: [{name: lb0}]\nkubernetes:\n  addresses: [cluster_ip, external_ips, load_balancer, node_ports]\n",
        "c.yaml",
    )
    .expect("a valid config")
    .raw
    .kubernetes
    .expect("a kubernetes section");
    let node_addresses = [
        "192.0.2.10".parse().unwrap(),
        "2001:db8::10".parse().unwrap(),
    ];
    let here = Locality {
        node: Some("node-1"),
        zone: Some("zone-a"),
        addresses: &node_addresses,
    };
    let trust = Trust::new(&spec, &[]);
    let found = desired(&[Arc::new(svc)], &[Arc::new(slice)], &spec, &here, &trust);
    for service in found.services {
        for (addr, weight) in &service.backends {
            prop_assert_eq!(
                addr.is_ipv4(),
                service.vip.is_ipv4(),
                "{}: {}",
                service.name,
                addr
            );
            prop_assert!(*weight <= MAX_WEIGHT, "{}: weight {}", service.name, weight);
        }
    }
    Ok(())
}

#[test]
fn the_kubernetes_pair_gives_backends() {
    let (svc, slice) = kubernetes_pair();
    let svc: Service = serde_json::from_value(svc).unwrap();
    let slice: EndpointSlice = serde_json::from_value(slice).unwrap();
    let spec = crate::config::parse("interfaces: [{name: lb0}]\nkubernetes: {}\n", "c.yaml")
        .unwrap()
        .raw
        .kubernetes
        .unwrap();
    let found = desired(
        &[Arc::new(svc)],
        &[Arc::new(slice)],
        &spec,
        &Locality::default(),
        &Trust::new(&spec, &[]),
    );
    assert_eq!(found.services[0].backends.len(), 2, "{:?}", found.services);
}

proptest! {
    #[test]
    fn fuzz_etcd_watch_messages(message in json_value(), pick in any::<usize>(), to in json_value()) {
        let mut snap = Snapshot { revision: 1, values: BTreeMap::new() };
        let _ = apply_watch_message(&mut snap, &message);
        let mut valid = watch_message(b"/s/a", br#"{"address":"10.0.0.1:80"}"#);
        spoil(&mut valid, pick, to);
        let _ = apply_watch_message(&mut snap, &valid);
        check_backends(&snap)?;
    }

    #[test]
    fn fuzz_etcd_values(values in proptest::collection::btree_map(
        proptest::collection::vec(any::<u8>(), 0..12), backend_value(), 0..6)
    ) {
        check_backends(&Snapshot { revision: 1, values })?;
    }

    #[test]
    fn fuzz_kubernetes_objects(
        which in 0..3u8, pick in any::<usize>(), to in json_value(),
        svc in json_value(), slice in json_value(),
    ) {
        let (mut good_svc, mut good_slice) = kubernetes_pair();
        match which {
            0 => spoil(&mut good_svc, pick, to),
            1 => spoil(&mut good_slice, pick, to),
            _ => {
                good_svc = svc;
                good_slice = slice;
            }
        }
        check_kubernetes(good_svc, good_slice)?;
    }
}
