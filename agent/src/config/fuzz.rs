//! The config parser under proptest (`cargo xtask fuzz config` runs it
//! longer): YAML-ish token soup and mutated valid configs. Whatever the
//! input, parsing never panics, a refusal names where the problem is (the
//! field for a value `validate` refuses, the line or the field for what
//! serde can't read), and what is accepted holds together.

use proptest::prelude::*;

use super::{ConfigError, parse};

/// Every section and most fields, valid.
const FULL: &str = r#"interfaces:
  - name: lb0
  - name: "eth*"
    attach: tc
conntrack:
  max_entries: 65536
  affinity_max_entries: 65536
  timeouts:
    tcp_syn_sent: 30
    tcp_established: 3600
    tcp_closing: 30
    tcp_time_wait: 5
    udp: 30
maglev:
  table_size: 16381
limits:
  max_services: 16
  max_backends: 256
metrics:
  backend_latency_histogram: false
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    protocol: tcp
    backends:
      - address: 10.0.1.1:8080
      - address: 10.0.1.2:8080
        weight: 3
    failure:
      consecutive_failures: 3
      ejection_seconds: 10
      max_ejection_seconds: 300
      max_ejected_percent: 50
      retry_on_refused: true
      connect_timeout_ms: 500
      probe: true
    drain_timeout_seconds: 60
    metrics:
      backend_latency_histogram: true
    affinity:
      client_ip:
        timeout_seconds: 10800
    algorithm: least_connections
    allowed_sources: [10.0.0.0/8, "fd00::/8", 192.0.2.7]
  - name: dns6
    vip: "fd00::1"
    port: 53
    protocol: udp
    forwarding: snat
    snat_ip: "fd00::2"
    backends:
      - address: "[fd00::3]:5353"
  - name: dsr
    vip: 10.0.0.4
    port: 80
    protocol: tcp
    forwarding: dsr
    dsr:
      encapsulation: ipip
    snat_ip: 10.0.0.5
    backends:
      - address: 10.0.1.4:80
  - name: api
    vip: 10.0.0.2
    port: 443
    protocol: tcp
    discovery:
      allow_empty: true
      dns:
        name: _https._tcp.api.example
        type: srv
        min_interval_seconds: 5
        max_interval_seconds: 60
  - name: kv
    vip: 10.0.0.3
    port: 443
    protocol: tcp
    discovery:
      etcd:
        endpoints: ["http://127.0.0.1:2379"]
        prefix: /sluice/kv/
pinning:
  directory: /sys/fs/bpf/sluice/node-1
kubernetes:
  namespace: default
  service_selector: sluice.io/enabled=true
  addresses: [cluster_ip]
  drain_timeout_seconds: 30
socket_lb:
  cgroup: /sys/fs/cgroup
"#;

/// Words that mean something to the parser, and values of every kind.
const WORDS: &[&str] = &[
    "interfaces",
    "services",
    "name",
    "vip",
    "port",
    "protocol",
    "backends",
    "address",
    "weight",
    "forwarding",
    "snat_ip",
    "allowed_sources",
    "10.0.0.0/8",
    "\"fd00::/8\"",
    "failure",
    "affinity",
    "client_ip",
    "timeout_seconds",
    "algorithm",
    "least_connections",
    "discovery",
    "dns",
    "etcd",
    "conntrack",
    "maglev",
    "limits",
    "pinning",
    "kubernetes",
    "socket_lb",
    "attach",
    "max_entries",
    "table_size",
    "endpoints",
    "prefix",
    "record",
    "tcp",
    "udp",
    "snat",
    "dnat",
    "dsr",
    "encapsulation",
    "ipip",
    "none",
    "auto",
    "10.0.0.1",
    "fd00::1",
    "\"[fd00::1]:80\"",
    "10.0.1.1:8080",
    "0",
    "-1",
    "65536",
    "4294967296",
    "1e9",
    "0x10",
    "~",
    "null",
    "true",
    "yes",
    "\"\"",
    "[]",
    "{}",
    "- ",
    ": ",
    "&a",
    "*a",
    "!!str",
    "|",
    ">",
    "#",
    "'",
    "\"",
    "\t",
    "\u{0}",
    "é",
    "🦀",
];

fn token_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        4 => proptest::sample::select(WORDS).prop_map(str::to_string),
        1 => any::<String>(),
        1 => "[ \n:-]{1,4}",
    ];
    let line = (0usize..6, proptest::collection::vec(token, 0..5))
        .prop_map(|(indent, tokens)| format!("{}{}", "  ".repeat(indent), tokens.join(" ")));
    proptest::collection::vec(line, 0..30).prop_map(|lines| lines.join("\n"))
}

/// One change to a line of `FULL`.
#[derive(Debug, Clone)]
enum Edit {
    Delete,
    Duplicate,
    /// The value after the first ": " replaced.
    Value(String),
    Indent(usize),
    /// A character inserted at a position (modulo the line's length).
    Insert(usize, char),
    /// Everything from this line on removed.
    Truncate,
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        Just(Edit::Delete),
        Just(Edit::Duplicate),
        proptest::sample::select(WORDS).prop_map(|w| Edit::Value(w.to_string())),
        any::<String>().prop_map(Edit::Value),
        (0usize..12).prop_map(Edit::Indent),
        (any::<usize>(), any::<char>()).prop_map(|(at, c)| Edit::Insert(at, c)),
        Just(Edit::Truncate),
    ]
}

fn mutated(edits: &[(usize, Edit)]) -> String {
    let mut lines: Vec<String> = FULL.lines().map(str::to_string).collect();
    for (at, edit) in edits {
        if lines.is_empty() {
            break;
        }
        let i = at % lines.len();
        match edit {
            Edit::Delete => {
                lines.remove(i);
            }
            Edit::Duplicate => lines.insert(i, lines[i].clone()),
            Edit::Value(v) => {
                if let Some((key, _)) = lines[i].split_once(": ") {
                    lines[i] = format!("{key}: {v}");
                }
            }
            Edit::Indent(n) => lines[i] = format!("{}{}", " ".repeat(*n), lines[i].trim_start()),
            Edit::Insert(pos, c) => {
                let chars: Vec<char> = lines[i].chars().collect();
                let pos = pos % (chars.len() + 1);
                lines[i] = chars[..pos]
                    .iter()
                    .chain(std::iter::once(c))
                    .chain(&chars[pos..])
                    .collect();
            }
            Edit::Truncate => lines.truncate(i),
        }
    }
    lines.join("\n")
}

/// Parses `text`: no panic (proptest reports one with the input), and
/// either a config that holds together or an error that says where.
fn check(text: &str) -> Result<(), TestCaseError> {
    match parse(text, "c.yaml") {
        Ok(v) => {
            for s in &v.services {
                for (addr, weight) in &s.backends {
                    prop_assert_eq!(addr.is_ipv4(), s.vip.is_ipv4(), "{}: {}", s.name, addr);
                    prop_assert!(*weight <= super::MAX_WEIGHT);
                }
                if let Some(snat) = s.snat_ip {
                    prop_assert_eq!(snat.is_ipv4(), s.vip.is_ipv4());
                }
                if let Some(t) = s.affinity_timeout {
                    prop_assert!((1..=super::MAX_AFFINITY_TIMEOUT_SECONDS).contains(&t));
                }
                // DSR can't change ports; a tunnel needs its outer source.
                if s.dsr.is_some() {
                    prop_assert!(s.backends.iter().all(|(a, _)| a.port() == s.port));
                }
                if s.dsr == Some(super::Encapsulation::Ipip) {
                    prop_assert!(s.snat_ip.is_some());
                }

                // Accepted blocks are blocks: their text parses back as itself.
                for c in s.allowed_sources.iter().flatten() {
                    prop_assert_eq!(super::Cidr::parse(&c.to_string()), Ok(*c));
                }
            }
        }
        Err(ConfigError::Invalid {
            path, field, why, ..
        }) => {
            prop_assert_eq!(path, "c.yaml");
            prop_assert!(!field.is_empty() && !why.is_empty(), "{field}: {why}");
        }
        Err(e @ ConfigError::Parse { .. }) => {
            let text = e.to_string();
            prop_assert!(text.starts_with("config file c.yaml: "), "{text}");
            // It says where: a line.
            let located = [" line ", "(line ", " lines "]
                .iter()
                .any(|w| text.contains(w));
            prop_assert!(located, "a parse error that doesn't say where: {text}");
        }
        Err(e @ ConfigError::Read { .. }) => prop_assert!(false, "read error from text: {e}"),
    }
    Ok(())
}

#[test]
fn the_full_config_is_valid() {
    let v = parse(FULL, "c.yaml").expect("FULL parses");
    assert_eq!(v.services.len(), 5);
}

proptest! {

    #[test]
    fn fuzz_any_text(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn fuzz_token_soup(text in token_soup()) {
        check(&text)?;
    }

    #[test]
    fn fuzz_mutated_valid_config(edits in proptest::collection::vec((any::<usize>(), edit()), 1..6)) {
        check(&mutated(&edits))?;
    }
}

/// What the fuzzer found: refusals that didn't say where. Each now does.
#[test]
fn refusals_found_by_fuzzing_say_where() {
    let error = |text: &str| parse(text, "c.yaml").unwrap_err().to_string();
    assert_eq!(
        error("interfaces"),
        "config file c.yaml: invalid value \"interfaces\": expected the config's \
         settings (interfaces:, services:, ...) at line 1 column 1"
    );
    let e = error("interfaces:\n  - name: a\nlimits: {}\nlimits: {}\n");
    assert!(
        e.contains("`limits` is set twice, the second time at line 4 column 1"),
        "{e}"
    );
    let e = error("interfaces:\n  - name: a\x0e\n");
    assert!(
        e.contains("unexpected character") && e.contains("line 2 column 11"),
        "{e}"
    );
    let e = error(" interfaces:\n  - name: a\nservices: []\n");
    assert!(
        e.contains("line 1 is indented by 1") && e.contains("line 3"),
        "{e}"
    );
    let e = error("interfaces: []\n---\nservices: []\n");
    assert!(
        e.contains("document markers on lines 2") && e.contains("starts at line 3"),
        "{e}"
    );
}
