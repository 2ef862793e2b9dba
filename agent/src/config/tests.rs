use super::*;

const GOOD: &str = r#"
interfaces:
  - name: lb0
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    protocol: tcp
    backends:
      - address: 10.0.1.1:8080
      - address: 10.0.1.2:8080
        weight: 3
"#;

fn error_of(text: &str) -> String {
    parse(text, "c.yaml").unwrap_err().to_string()
}

const DISCOVERED: &str = r#"
interfaces:
  - name: lb0
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    protocol: tcp
    discovery:
      dns:
        name: _http._tcp.web.example
"#;

#[test]
fn discovery_parses_with_defaults() {
    let v = parse(DISCOVERED, "c.yaml").unwrap();
    let d = v.services[0].discovery.as_ref().unwrap();
    assert!(!d.allow_empty);
    match &d.source {
        Source::Dns {
            record,
            port,
            server,
            min_interval,
            max_interval,
            ..
        } => {
            assert_eq!(*record, DnsRecord::Srv);
            assert_eq!((*port, *server), (None, None));
            assert_eq!(min_interval.as_secs(), 5);
            assert_eq!(max_interval.as_secs(), 300);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(v.services[0].drain_timeout.as_secs(), 60);
}

#[test]
fn discovery_errors_name_field_and_value() {
    let cases = [
        // Both sources, or neither.
        (
            "        name: _http._tcp.web.example\n",
            "        name: _http._tcp.web.example\n      etcd:\n        endpoints: [http://e:2379]\n        prefix: /x/\n",
            "services[0].discovery",
        ),
        // A/AAAA need a port; SRV has its own.
        (
            "        name: _http._tcp.web.example\n",
            "        name: web.example\n        type: a\n",
            "services[0].discovery.dns.port",
        ),
        (
            "        name: _http._tcp.web.example\n",
            "        name: web.example\n        type: srv\n        port: 80\n",
            "services[0].discovery.dns.port",
        ),
        // The record type must fit the VIP's family.
        (
            "        name: _http._tcp.web.example\n",
            "        name: web.example\n        type: aaaa\n        port: 80\n",
            "services[0].discovery.dns.type",
        ),
        (
            "        name: _http._tcp.web.example\n",
            "        name: x\n        server: nameserver\n",
            "services[0].discovery.dns.server",
        ),
        (
            "        name: _http._tcp.web.example\n",
            "        name: x\n        min_interval_seconds: 10\n        max_interval_seconds: 5\n",
            "services[0].discovery.dns.max_interval_seconds",
        ),
    ];
    for (from, to, field) in cases {
        let e = error_of(&DISCOVERED.replace(from, to));
        assert!(e.contains(field), "{field}: {e}");
    }
    let e = error_of(&DISCOVERED.replace(
        "      dns:\n        name: _http._tcp.web.example\n",
        "      etcd:\n        endpoints: [\"https://e:2379\"]\n        prefix: /x/\n",
    ));
    assert!(
        e.contains("services[0].discovery.etcd.endpoints[0]") && e.contains("https://e:2379"),
        "{e}"
    );
    // Static backends and discovery together.
    let e = error_of(&DISCOVERED.replace(
        "    discovery:",
        "    backends:\n      - address: 10.0.1.1:80\n    discovery:",
    ));
    assert!(e.contains("services[0].discovery"), "{e}");
    let e = error_of(&format!("{GOOD}pinning:\n  directory: relative/dir\n"));
    assert!(
        e.contains("pinning.directory") && e.contains("relative/dir"),
        "{e}"
    );
}

#[test]
fn good_config_parses_with_defaults() {
    let v = parse(GOOD, "c.yaml").unwrap();
    assert_eq!(v.services[0].backends[0].1, 1);
    assert_eq!(v.services[0].backends[1].1, 3);
    assert_eq!(v.raw.conntrack.max_entries, 262_144);
    assert_eq!(v.raw.interfaces[0].attach, AttachMode::Auto);
    assert!(v.services[0].failure.retry_on_refused);
}

#[test]
fn errors_name_field_and_value() {
    let e = error_of(&GOOD.replace("10.0.1.2:8080", "10.0.1.2"));
    assert!(e.contains("services[0].backends[1].address"), "{e}");
    assert!(e.contains("\"10.0.1.2\""), "{e}");

    let e = error_of(&GOOD.replace("vip: 10.0.0.1", "vip: nope"));
    assert!(e.contains("services[0].vip") && e.contains("nope"), "{e}");

    let e = error_of(&GOOD.replace("10.0.1.1:8080", "\"[fd00::1]:80\""));
    assert!(e.contains("same family"), "{e}");

    let e = error_of(&GOOD.replace("port: 80", "port: 70000"));
    assert!(e.contains("port") && e.contains("70000"), "{e}");

    let e = error_of(&GOOD.replace("protocol: tcp", "protocol: sctp"));
    assert!(e.contains("protocol") && e.contains("sctp"), "{e}");

    let e = error_of(&GOOD.replace("protocol: tcp", "protocol: tcp\n    forwarding: snat"));
    assert!(e.contains("snat_ip"), "{e}");

    let e = error_of(&format!("{GOOD}maglev:\n  table_size: 1000\n"));
    assert!(e.contains("maglev.table_size") && e.contains("1000"), "{e}");

    let e = error_of(&GOOD.replace("weight: 3", "wieght: 3"));
    assert!(e.contains("wieght"), "{e}");
}

#[test]
fn primes() {
    assert!(is_prime(16_381) && is_prime(65_537) && is_prime(251));
    assert!(!is_prime(16_383) && !is_prime(1) && !is_prime(65_536));
}

/// The message of the refusal of `text` (it names the field).
#[track_caller]
fn refusal(text: &str) -> String {
    match parse(text, "c.yaml") {
        Err(e @ ConfigError::Invalid { .. }) => e.to_string(),
        other => panic!("not a refusal: {other:?}"),
    }
}

#[test]
fn minimums_and_maximums_share_their_texts() {
    let dns = |settings: &str| {
        DISCOVERED.replace(
            "name: _http._tcp.web.example\n",
            &format!("name: _http._tcp.web.example\n{settings}"),
        )
    };
    assert_eq!(
        refusal(&dns("        min_interval_seconds: 0\n")),
        "config file c.yaml: services[0].discovery.dns.min_interval_seconds: invalid value \"0\": must be at least 1"
    );
    assert_eq!(
        refusal(&dns(
            "        min_interval_seconds: 10\n        max_interval_seconds: 5\n"
        )),
        "config file c.yaml: services[0].discovery.dns.max_interval_seconds: invalid value \"5\": must be at least dns.min_interval_seconds"
    );
    assert_eq!(
        refusal(&format!(
            "{GOOD}kubernetes:\n  failure:\n    ejection_seconds: 0\n"
        )),
        "config file c.yaml: kubernetes.failure.ejection_seconds: invalid value \"0\": must be at least 1"
    );
}

#[test]
fn weight_over_the_maximum_is_refused() {
    assert_eq!(
        refusal(&GOOD.replace("weight: 3", "weight: 1001")),
        "config file c.yaml: services[0].backends[1].weight: invalid value \"1001\": must be 0 (drain) to 1000"
    );
    // The maximum, and 0 (draining), are weights.
    for weight in ["1000", "0"] {
        let v = parse(
            &GOOD.replace("weight: 3", &format!("weight: {weight}")),
            "c.yaml",
        );
        assert_eq!(v.unwrap().services[0].backends[1].1.to_string(), weight);
    }
}

#[test]
fn a_backend_listed_twice_is_refused_before_its_weight() {
    assert_eq!(
        refusal(&GOOD.replace(
            "10.0.1.2:8080\n        weight: 3",
            "10.0.1.1:8080\n        weight: 5000"
        )),
        "config file c.yaml: services[0].backends[1].address: invalid value \"10.0.1.1:8080\": listed twice"
    );
}

#[test]
fn backend_addresses_must_be_unicast_with_a_port() {
    assert_eq!(
        refusal(&GOOD.replace("10.0.1.1:8080", "10.0.1.1:0")),
        "config file c.yaml: services[0].backends[0].address: invalid value \"10.0.1.1:0\": needs a non-zero port"
    );
    for (address, class) in [
        ("0.0.0.0:80", "an unspecified address (0.0.0.0/8, ::)"),
        ("224.0.0.1:80", "a multicast address"),
        ("127.0.0.1:80", "a loopback address"),
        ("169.254.1.1:80", "a link-local address"),
        ("255.255.255.255:80", "the broadcast address"),
        ("169.254.169.254:80", "a cloud metadata address"),
    ] {
        assert_eq!(
            refusal(&GOOD.replace("10.0.1.1:8080", address)),
            format!(
                "config file c.yaml: services[0].backends[0].address: invalid value \"{address}\": {class} can't be a backend"
            )
        );
    }
    assert_eq!(
        refusal(&GOOD.replace("10.0.1.1:8080", "backend-1:80")),
        "config file c.yaml: services[0].backends[0].address: invalid value \"backend-1:80\": expected IP:PORT, or [IPv6]:PORT"
    );
}

/// A VIP, a backend and an snat_ip of a refused class are refused, naming
/// the field and the value (IPv4 and IPv6).
#[test]
fn loopback_link_local_multicast_and_broadcast_are_refused_everywhere() {
    let v6 = GOOD
        .replace("vip: 10.0.0.1", "vip: \"fd00::1\"")
        .replace("10.0.1.1:8080", "\"[fd00:1::1]:8080\"")
        .replace("10.0.1.2:8080", "\"[fd00:1::2]:8080\"");
    for (text, from, to, field, class) in [
        (
            GOOD,
            "vip: 10.0.0.1",
            "vip: 127.0.0.1",
            "services[0].vip",
            "a loopback address can't be a VIP",
        ),
        (
            GOOD,
            "vip: 10.0.0.1",
            "vip: 169.254.0.7",
            "services[0].vip",
            "a link-local address can't be a VIP",
        ),
        (
            GOOD,
            "vip: 10.0.0.1",
            "vip: 255.255.255.255",
            "services[0].vip",
            "the broadcast address can't be a VIP",
        ),
        (
            GOOD,
            "vip: 10.0.0.1",
            "vip: 239.1.1.1",
            "services[0].vip",
            "a multicast address can't be a VIP",
        ),
        (
            GOOD,
            "vip: 10.0.0.1",
            "vip: 0.0.0.0",
            "services[0].vip",
            "an unspecified address (0.0.0.0/8, ::) can't be a VIP",
        ),
        (
            &v6,
            "vip: \"fd00::1\"",
            "vip: \"::1\"",
            "services[0].vip",
            "a loopback address can't be a VIP",
        ),
        (
            &v6,
            "vip: \"fd00::1\"",
            "vip: \"fe80::1\"",
            "services[0].vip",
            "a link-local address can't be a VIP",
        ),
        (
            &v6,
            "\"[fd00:1::2]:8080\"",
            "\"[::1]:8080\"",
            "services[0].backends[1].address",
            "a loopback address can't be a backend",
        ),
        (
            &v6,
            "\"[fd00:1::2]:8080\"",
            "\"[fe80::2]:8080\"",
            "services[0].backends[1].address",
            "a link-local address can't be a backend",
        ),
        (
            &v6,
            "\"[fd00:1::2]:8080\"",
            "\"[fd00:ec2::254]:80\"",
            "services[0].backends[1].address",
            "a cloud metadata address can't be a backend",
        ),
        (
            GOOD,
            "protocol: tcp",
            "protocol: tcp\n    forwarding: snat\n    snat_ip: 127.0.0.1",
            "services[0].snat_ip",
            "a loopback address can't be snat_ip",
        ),
        (
            GOOD,
            "protocol: tcp",
            "protocol: tcp\n    forwarding: snat\n    snat_ip: 169.254.9.9",
            "services[0].snat_ip",
            "a link-local address can't be snat_ip",
        ),
        (
            GOOD,
            "protocol: tcp",
            "protocol: tcp\n    forwarding: snat\n    snat_ip: 255.255.255.255",
            "services[0].snat_ip",
            "the broadcast address can't be snat_ip",
        ),
    ] {
        let value = to.rsplit(": ").next().unwrap().trim_matches('"');
        assert_eq!(
            refusal(&text.replace(from, to)),
            format!("config file c.yaml: {field}: invalid value \"{value}\": {class}"),
        );
    }
    // The IPv6 config itself is fine.
    parse(&v6, "c.yaml").unwrap();
}

#[test]
fn kubernetes_namespaces_and_external_cidrs_are_checked() {
    let k = |settings: &str| format!("{GOOD}kubernetes:\n{settings}");
    let v = parse(
        &k("  namespaces: [shop, web-2]\n  addresses: [cluster_ip, load_balancer]\n  external_cidrs: [192.0.2.0/24, \"2001:db8::/64\"]\n"),
        "c.yaml",
    )
    .unwrap();
    let kube = v.raw.kubernetes.unwrap();
    assert_eq!(kube.allowed_namespaces().unwrap(), ["shop", "web-2"]);
    // Left out: every namespace, no CIDR check (existing configs work on).
    let v = parse(&k("  addresses: [external_ips]\n"), "c.yaml").unwrap();
    let kube = v.raw.kubernetes.unwrap();
    assert!(kube.allowed_namespaces().is_none() && kube.external_cidrs.is_none());
    for (settings, want) in [
        (
            "  namespaces: []\n",
            "kubernetes.namespaces: invalid value \"[]\": name at least one namespace, or leave it out for every namespace",
        ),
        (
            "  namespaces: [shop, Shop]\n",
            "kubernetes.namespaces[1]: invalid value \"Shop\": not a namespace name (lowercase letters, digits and '-', at most 63)",
        ),
        (
            "  namespaces: [shop, shop]\n",
            "kubernetes.namespaces[1]: invalid value \"shop\": listed twice",
        ),
        (
            "  namespace: shop\n  namespaces: [web]\n",
            "kubernetes.namespace: invalid value \"shop\": set namespace or namespaces, not both (namespaces: [a, b] lists them all)",
        ),
        (
            "  addresses: [external_ips]\n  external_cidrs: [192.0.2.1/24]\n",
            "kubernetes.external_cidrs[0]: invalid value \"192.0.2.1/24\": host bits are set: the block is 192.0.2.0/24",
        ),
        (
            "  addresses: [external_ips]\n  external_cidrs: [10.0.0.0/8, nope]\n",
            "kubernetes.external_cidrs[1]: invalid value \"nope\": expected ADDRESS/PREFIX (e.g. 192.0.2.0/24)",
        ),
        (
            "  addresses: [external_ips]\n  external_cidrs: []\n",
            "kubernetes.external_cidrs: invalid value \"[]\": allows no address: name a block, or drop external_ips and load_balancer from addresses",
        ),
        (
            "  external_cidrs: [192.0.2.0/24]\n",
            "kubernetes.external_cidrs: invalid value \"192.0.2.0/24\": only used with addresses external_ips or load_balancer",
        ),
    ] {
        assert_eq!(refusal(&k(settings)), format!("config file c.yaml: {want}"));
    }
}

#[test]
fn backends_and_snat_ip_must_be_of_the_vips_family() {
    assert_eq!(
        refusal(&GOOD.replace("10.0.1.1:8080", "\"[fd00::1]:80\"")),
        "config file c.yaml: services[0].backends[0].address: invalid value \"[fd00::1]:80\": must be of the same family as the service's VIP"
    );
    assert_eq!(
        refusal(&GOOD.replace(
            "protocol: tcp",
            "protocol: tcp\n    forwarding: snat\n    snat_ip: fd00::9"
        )),
        "config file c.yaml: services[0].snat_ip: invalid value \"fd00::9\": must be of the same family as the VIP"
    );
}

#[test]
fn two_services_with_one_name_are_refused() {
    let twice = GOOD.replace(
        "services:\n",
        "services:\n  - name: web\n    vip: 10.0.0.2\n    port: 53\n    protocol: udp\n",
    );
    assert_eq!(
        refusal(&twice),
        "config file c.yaml: services[1].name: invalid value \"web\": two services have this name"
    );
    let same_frontend = twice.replace(
        "name: web\n    vip: 10.0.0.2\n    port: 53\n    protocol: udp",
        "name: api\n    vip: 10.0.0.1\n    port: 80\n    protocol: tcp",
    );
    assert_eq!(
        refusal(&same_frontend),
        "config file c.yaml: services[1].vip: invalid value \"10.0.0.1\": service api has the same VIP, port and protocol"
    );
}

#[test]
fn an_unknown_attach_mode_is_a_parse_error_naming_the_field() {
    let text = GOOD.replace("  - name: lb0\n", "  - name: lb0\n    attach: xdp-turbo\n");
    match parse(&text, "c.yaml") {
        Err(ConfigError::Parse { path, message }) => {
            assert_eq!(path, "c.yaml");
            assert_eq!(
                message,
                "interfaces[0].attach: unknown variant `xdp-turbo`, expected one of auto, xdp-native, xdp-generic, tc at line 4 column 13"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn interface_names_are_checked() {
    assert_eq!(
        refusal(&GOOD.replace("name: lb0", "name: a-very-long-name0")),
        "config file c.yaml: interfaces[0].name: invalid value \"a-very-long-name0\": not a Linux interface name (1 to 15 characters, no '/')"
    );
    assert_eq!(
        refusal(&GOOD.replace("  - name: lb0\n", "  - name: lb0\n  - name: lb0\n")),
        "config file c.yaml: interfaces[1].name: invalid value \"lb0\": listed twice"
    );
}

#[test]
fn maglev_table_size_must_be_a_prime_in_range() {
    for size in ["16383", "241", "1000033"] {
        assert_eq!(
            refusal(&format!("{GOOD}maglev:\n  table_size: {size}\n")),
            format!(
                "config file c.yaml: maglev.table_size: invalid value \"{size}\": must be a prime between 251 and 1000003 (e.g. 16381 or 65537)"
            )
        );
    }
    // The largest limits and table: the slot pool (tables sized by backend
    // count, not two of table_size per service) stays within what the
    // kernel allows an array (value size × entries < 4 GiB).
    let v = parse(
        &format!(
            "{GOOD}maglev:\n  table_size: 1000003\nlimits:\n  max_services: 65536\n  max_backends: 1048576\n"
        ),
        "c.yaml",
    )
    .unwrap();
    let sizes = crate::datapath::Sizes::from_config(&v.raw);
    let pool =
        crate::reconcile::slots::pool_slots(sizes.services, sizes.backends, sizes.table_size);
    assert!(pool * 8 < u64::from(u32::MAX), "{pool}");
}

#[test]
fn conntrack_and_failure_settings_are_range_checked() {
    assert_eq!(
        refusal(&format!("{GOOD}conntrack:\n  timeouts:\n    udp: 0\n")),
        "config file c.yaml: conntrack.timeouts.udp: invalid value \"0\": must be 1 to 2592000 seconds (30 days)"
    );
    assert_eq!(
        refusal(&format!(
            "{GOOD}kubernetes:\n  failure:\n    consecutive_failures: 0\n"
        )),
        "config file c.yaml: kubernetes.failure.consecutive_failures: invalid value \"0\": must be at least 1"
    );
    assert_eq!(
        refusal(&GOOD.replace(
            "protocol: tcp",
            "protocol: tcp\n    failure:\n      ejection_seconds: 20\n      max_ejection_seconds: 10"
        )),
        "config file c.yaml: services[0].failure.max_ejection_seconds: invalid value \"10\": must be at least failure.ejection_seconds"
    );
}

#[test]
fn discovery_sources_are_checked() {
    assert_eq!(
        refusal(&DISCOVERED.replace(
            "      dns:\n        name: _http._tcp.web.example\n",
            "      allow_empty: true\n"
        )),
        "config file c.yaml: services[0].discovery: invalid value \"{}\": name exactly one source: dns or etcd"
    );
    assert_eq!(
        refusal(&DISCOVERED.replace(
            "name: _http._tcp.web.example",
            "name: web.example\n        type: aaaa\n        port: 80"
        )),
        "config file c.yaml: services[0].discovery.dns.type: invalid value \"aaaa\": an IPv4 service needs type a"
    );
    assert_eq!(
        refusal(&DISCOVERED.replace(
            "      dns:\n        name: _http._tcp.web.example\n",
            "      etcd:\n        endpoints: [\"http://e:2379\", \"https://e:2379\"]\n        prefix: /x/\n"
        )),
        "config file c.yaml: services[0].discovery.etcd.endpoints[1]: invalid value \"https://e:2379\": expected http://HOST:PORT (TLS is not supported yet)"
    );
    assert_eq!(
        refusal(&DISCOVERED.replace(
            "    discovery:",
            "    backends:\n      - address: 10.0.1.1:80\n    discovery:"
        )),
        "config file c.yaml: services[0].discovery: invalid value \"dns/etcd\": a service takes its backends from `backends` or from `discovery`, not both"
    );
}

#[test]
fn too_many_backends_over_all_services_are_refused() {
    assert_eq!(
        refusal(&format!("{GOOD}limits:\n  max_backends: 1\n")),
        "config file c.yaml: services: invalid value \"2 backends\": more than limits.max_backends (1)"
    );
}

#[test]
fn the_shared_backend_check() {
    use super::validate::{BackendError, backend};
    let v4: std::net::IpAddr = "10.0.0.1".parse().unwrap();
    let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    assert_eq!(backend(at("10.0.1.1:80"), 0, v4), Ok(()));
    assert_eq!(backend(at("10.0.1.1:80"), MAX_WEIGHT, v4), Ok(()));
    let refused = [
        (
            backend(at("[fd00::1]:80"), 1, v4),
            "backend [fd00::1]:80: not of the VIP's address family (10.0.0.1)",
        ),
        (
            backend(at("10.0.1.1:0"), 1, v4),
            "backend 10.0.1.1:0: needs a non-zero port",
        ),
        (
            backend(at("0.0.0.0:80"), 1, v4),
            "backend 0.0.0.0:80: an unspecified address (0.0.0.0/8, ::) can't be a backend",
        ),
        (
            backend(at("127.0.0.1:80"), 1, v4),
            "backend 127.0.0.1:80: a loopback address can't be a backend",
        ),
        (
            backend(at("10.0.1.1:80"), 1001, v4),
            "backend 10.0.1.1:80: weight 1001 over the maximum 1000",
        ),
    ];
    for (result, text) in refused {
        assert_eq!(result.unwrap_err().to_string(), text);
    }
    // The family comes first.
    assert!(matches!(
        backend(at("[ff02::1]:0"), 5000, v4),
        Err(BackendError::Family { .. })
    ));
}

/// What the YAML reader refuses (before validation) names the field's path
/// and the value as written, and says where.
#[test]
fn parse_errors_name_field_path_and_value() {
    let cases = [
        // A wrong type.
        (
            GOOD.replace("port: 80", "port: eighty"),
            "services[0].port: invalid value \"eighty\": invalid u16 at line 7 column 11",
        ),
        (
            GOOD.replace("weight: 3", "weight: heavy"),
            "services[0].backends[1].weight: invalid value \"heavy\": invalid u32 at line 12 column 17",
        ),
        (
            format!("{GOOD}conntrack:\n  max_entries: -1\n"),
            "conntrack.max_entries: invalid value \"-1\": invalid u32 at line 14 column 16",
        ),
        (
            GOOD.replace("protocol: tcp", "protocol: tcp\n    failure: 3"),
            "services[0].failure: invalid value \"3\": expected a mapping (key: value) at line 9 column 14",
        ),
        (
            "interfaces: {}\n".into(),
            "interfaces: expected a list at line 1 column 13",
        ),
        // YAML 1.1 booleans are refused, not guessed.
        (
            GOOD.replace(
                "protocol: tcp",
                "protocol: tcp\n    failure:\n      probe: no",
            ),
            "services[0].failure.probe: invalid value \"no\": invalid boolean (strict mode expects true/false) at line 10 column 14",
        ),
        // An unknown field, at the top and deeper.
        (
            format!("{GOOD}metrcs: {{}}\n"),
            "metrcs: unknown field `metrcs`, expected one of interfaces, conntrack, maglev, limits, \
             services, pinning, kubernetes, socket_lb, control, metrics, node at line 13 column 1",
        ),
        (
            GOOD.replace("weight: 3", "wieght: 3"),
            "services[0].backends[1].wieght: unknown field `wieght`, expected one of address, weight, node at line 12 column 9",
        ),
        // A bad enum value.
        (
            GOOD.replace("protocol: tcp", "protocol: sctp"),
            "services[0].protocol: unknown variant `sctp`, expected one of tcp, udp at line 8 column 15",
        ),
        (
            GOOD.replace("    port: 80\n", ""),
            "services[0]: missing field `port` at line 8 column 5",
        ),
        (
            String::new(),
            "the file is empty: expected the config's settings (interfaces:, services:, ...) at line 1 column 1",
        ),
    ];
    for (text, want) in cases {
        match parse(&text, "c.yaml") {
            Err(ConfigError::Parse { message, .. }) => assert_eq!(message, want),
            other => panic!("{want}: {other:?}"),
        }
    }
    // A bad address is validation's (it names the field and value too).
    assert_eq!(
        error_of(&GOOD.replace("10.0.1.2:8080", "10.0.1.2:http")),
        "config file c.yaml: services[0].backends[1].address: invalid value \"10.0.1.2:http\": \
         expected IP:PORT, or [IPv6]:PORT"
    );
}

#[test]
fn the_latency_histogram_is_on_unless_turned_off_globally_or_per_service() {
    let v = parse(GOOD, "c.yaml").unwrap();
    assert!(v.raw.metrics.backend_latency_histogram);
    assert_eq!(v.services[0].backend_latency_histogram, None);

    let text = format!("{GOOD}metrics:\n  backend_latency_histogram: false\n").replace(
        "protocol: tcp",
        "protocol: tcp\n    metrics:\n      backend_latency_histogram: true",
    );
    let v = parse(&text, "c.yaml").unwrap();
    assert!(!v.raw.metrics.backend_latency_histogram);
    assert_eq!(v.services[0].backend_latency_histogram, Some(true));

    // Wrong values and typos name the field and the value.
    let e = error_of(&format!(
        "{GOOD}metrics:\n  backend_latency_histogram: off\n"
    ));
    assert_eq!(
        e,
        "config file c.yaml: metrics.backend_latency_histogram: invalid value \"off\": \
         invalid boolean (strict mode expects true/false) at line 14 column 30"
    );
    let e = error_of(&GOOD.replace(
        "protocol: tcp",
        "protocol: tcp\n    metrics: {latency_histogram: false}",
    ));
    assert!(
        e.contains("services[0].metrics.latency_histogram: unknown field `latency_histogram`"),
        "{e}"
    );
}

#[test]
fn a_list_key_with_nothing_after_it_is_an_empty_list() {
    let text = "interfaces:\n  - name: eth0\nservices:\n  - name: web\n    vip: 10.0.0.1\n    port: 80\n    protocol: tcp\n    backends:\n";
    let c = parse(text, "c.yaml").expect("backends: with no items");
    assert!(c.services[0].backends.is_empty());
    let c = parse("interfaces:\n  - name: eth0\nservices:\n", "c.yaml")
        .expect("services: with no items");
    assert!(c.services.is_empty());
}

#[test]
fn session_affinity_parses_with_kubernetes_default_and_bounds() {
    let with = |affinity: &str| format!("{GOOD}    affinity: {affinity}\n");
    assert_eq!(
        parse(GOOD, "c.yaml").unwrap().services[0].affinity_timeout,
        None
    );
    let v = parse(&with("{client_ip: {timeout_seconds: 30}}"), "c.yaml").unwrap();
    assert_eq!(v.services[0].affinity_timeout, Some(30));
    let v = parse(&with("{client_ip: {}}"), "c.yaml").unwrap();
    assert_eq!(v.services[0].affinity_timeout, Some(10_800));
    let v = parse(&with("{client_ip: {timeout_seconds: 86400}}"), "c.yaml").unwrap();
    assert_eq!(v.services[0].affinity_timeout, Some(86_400));
    for (value, field, shown) in [
        (
            "{client_ip: {timeout_seconds: 0}}",
            "services[0].affinity.client_ip.timeout_seconds",
            "0",
        ),
        (
            "{client_ip: {timeout_seconds: 86401}}",
            "services[0].affinity.client_ip.timeout_seconds",
            "86401",
        ),
        ("{}", "services[0].affinity", "{}"),
    ] {
        let e = error_of(&with(value));
        assert!(e.contains(field) && e.contains(shown), "{value}: {e}");
    }
    // Not a number, a negative one, an unknown kind: serde names them.
    for (value, shown) in [
        ("{client_ip: {timeout_seconds: -1}}", "timeout_seconds"),
        ("{client_ip: {timeout_seconds: soon}}", "timeout_seconds"),
        ("{cookie: {}}", "cookie"),
    ] {
        let e = error_of(&with(value));
        assert!(e.contains(shown), "{value}: {e}");
    }
    let e = error_of(&format!("{GOOD}conntrack:\n  affinity_max_entries: 10\n"));
    assert!(
        e.contains("conntrack.affinity_max_entries") && e.contains("10"),
        "{e}"
    );
}

const DSR: &str = r#"
interfaces:
  - name: lb0
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    protocol: tcp
    forwarding: dsr
    backends:
      - address: 10.0.1.1:80
      - address: 10.0.1.2:80
"#;

#[test]
fn dsr_defaults_to_l2_and_takes_ipip_with_an_outer_source() {
    let v = parse(DSR, "c.yaml").unwrap();
    assert_eq!(v.services[0].dsr, Some(Encapsulation::None));
    assert_eq!(v.services[0].snat_ip, None);
    let v = parse(
        &DSR.replace(
            "forwarding: dsr",
            "forwarding: dsr\n    dsr: {encapsulation: ipip}\n    snat_ip: 10.0.9.1",
        ),
        "c.yaml",
    )
    .unwrap();
    assert_eq!(v.services[0].dsr, Some(Encapsulation::Ipip));
    assert_eq!(v.services[0].snat_ip, Some("10.0.9.1".parse().unwrap()));
    // Not DSR: no dsr.
    assert_eq!(parse(GOOD, "c.yaml").unwrap().services[0].dsr, None);
}

#[test]
fn dsr_refuses_what_it_cant_do_naming_the_field() {
    // DSR can't rewrite the port.
    let e = error_of(&DSR.replace("10.0.1.2:80", "10.0.1.2:8080"));
    assert!(
        e.contains("services[0].backends[1].address")
            && e.contains("10.0.1.2:8080")
            && e.contains("can't change the port"),
        "{e}"
    );
    // The tunnel needs its outer source.
    let e = error_of(&DSR.replace(
        "forwarding: dsr",
        "forwarding: dsr\n    dsr: {encapsulation: ipip}",
    ));
    assert!(
        e.contains("services[0].snat_ip") && e.contains("(missing)") && e.contains("ipip"),
        "{e}"
    );
    // L2 DSR has no use for one.
    let e = error_of(&DSR.replace("forwarding: dsr", "forwarding: dsr\n    snat_ip: 10.0.9.1"));
    assert!(
        e.contains("services[0].snat_ip") && e.contains("10.0.9.1"),
        "{e}"
    );
    // Of the VIP's family.
    let e = error_of(&DSR.replace(
        "forwarding: dsr",
        "forwarding: dsr\n    dsr: {encapsulation: ipip}\n    snat_ip: \"fd00::1\"",
    ));
    assert!(e.contains("same family"), "{e}");
    // dsr options without forwarding: dsr.
    let e = error_of(&GOOD.replace(
        "protocol: tcp",
        "protocol: tcp\n    dsr: {encapsulation: ipip}",
    ));
    assert!(
        e.contains("services[0].dsr") && e.contains("only used with forwarding: dsr"),
        "{e}"
    );
    // An unknown encapsulation.
    let e = error_of(&DSR.replace(
        "forwarding: dsr",
        "forwarding: dsr\n    dsr: {encapsulation: gue}",
    ));
    assert!(e.contains("gue"), "{e}");
}

#[test]
fn allowed_sources_parse_and_bad_blocks_are_refused_by_name() {
    let with = |list: &str| {
        GOOD.replace(
            "    protocol: tcp\n",
            &format!("    protocol: tcp\n    allowed_sources: {list}\n"),
        )
    };
    let v = parse(&with("[10.0.0.0/8, \"fd00::/8\", 192.0.2.7]"), "c.yaml").unwrap();
    let got: Vec<String> = v.services[0]
        .allowed_sources
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(got, ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]);
    // Absent or empty: no restriction.
    assert_eq!(
        parse(GOOD, "c.yaml").unwrap().services[0].allowed_sources,
        None
    );
    assert_eq!(
        parse(&with("[]"), "c.yaml").unwrap().services[0].allowed_sources,
        None
    );
    for (list, field, value) in [
        (
            "[10.0.0.0/33]",
            "services[0].allowed_sources[0]",
            "10.0.0.0/33",
        ),
        (
            "[10.0.0.0/8, 10.1.2.3/8]",
            "services[0].allowed_sources[1]",
            "10.1.2.3/8",
        ),
        ("[web]", "services[0].allowed_sources[0]", "web"),
        (
            "[10.0.0.0/8, 10.0.0.0/8]",
            "services[0].allowed_sources[1]",
            "10.0.0.0/8",
        ),
    ] {
        let e = error_of(&with(list));
        assert!(
            e.contains(field) && e.contains(&format!("{value:?}")),
            "{list}: {e}"
        );
    }
}

#[test]
fn node_ports_parse_and_collisions_name_both_services() {
    let text = r#"
interfaces: [{name: lb0}]
node: {name: node-a, addresses: [192.0.2.10, "2001:db8::10"]}
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    protocol: tcp
    node_port: 30080
    external_traffic_policy: local
    backends:
      - {address: 10.0.1.1:8080, node: node-a}
      - {address: 10.0.1.2:8080}
"#;
    let v = parse(text, "c.yaml").unwrap();
    let s = &v.services[0];
    assert_eq!(s.node_port, Some(30080));
    assert!(s.local_only);
    assert_eq!(
        s.backend_nodes
            .get(&"10.0.1.1:8080".parse().unwrap())
            .map(String::as_str),
        Some("node-a")
    );
    assert_eq!(v.raw.node.name.as_deref(), Some("node-a"));
    // Another service on the same node port and protocol: both named.
    let clash = text.to_string()
        + "  - name: api\n    vip: 10.0.0.2\n    port: 80\n    protocol: tcp\n    node_port: 30080\n";
    let e = refusal(&clash);
    assert!(
        e.contains("services[1].node_port") && e.contains("\"30080\"") && e.contains("service web"),
        "{e}"
    );
    // UDP on the same number is another port.
    parse(
        &clash.replace(
            "name: api\n    vip: 10.0.0.2\n    port: 80\n    protocol: tcp",
            "name: api\n    vip: 10.0.0.2\n    port: 80\n    protocol: udp",
        ),
        "c.yaml",
    )
    .unwrap();
    // A VIP that is a node address, on a node port's number.
    let on_node = text.to_string()
        + "  - name: api\n    vip: 192.0.2.10\n    port: 30080\n    protocol: tcp\n";
    let e = refusal(&on_node);
    assert!(
        e.contains("services[1].vip") && e.contains("service web"),
        "{e}"
    );
    for (from, to, field) in [
        ("node_port: 30080", "node_port: 0", "services[0].node_port"),
        (
            "node: node-a}",
            "node: \"\"}",
            "services[0].backends[0].node",
        ),
        (
            "addresses: [192.0.2.10,",
            "addresses: [127.0.0.1,",
            "node.addresses[0]",
        ),
        (
            "external_traffic_policy: local",
            "external_traffic_policy: nearby",
            "external_traffic_policy",
        ),
    ] {
        let text = text.replace(from, to);
        let e = parse(&text, "c.yaml").unwrap_err().to_string();
        assert!(e.contains(field), "{to}: {e}");
    }
}
