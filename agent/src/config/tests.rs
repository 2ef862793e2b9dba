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
