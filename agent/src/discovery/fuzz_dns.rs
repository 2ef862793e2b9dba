//! DNS discovery under proptest: a DNS server on loopback (written here,
//! answering in wire format) gives generated answers (SRV sets with any
//! priorities, weights, ports and targets; addresses of both families;
//! records of other types; empty answers, NXDOMAIN, SERVFAIL; any TTL), and
//! the real provider resolves against it. Nothing panics, a failure names
//! the DNS name, and the backends it reports are of the service's family
//! with weights in range.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use proptest::prelude::*;
use tokio::{net::UdpSocket, sync::mpsc};

use super::{Outcome, Reporter, dns};
use crate::config::{DnsRecord, MAX_WEIGHT, Source};

const SRV: u16 = 33;
const A: u16 = 1;
const AAAA: u16 = 28;
const TXT: u16 = 16;

/// One resource record of an answer.
#[derive(Debug, Clone)]
enum Record {
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        /// Index of the target name (`t{n}.example.`).
        target: u8,
    },
    Addr(IpAddr),
    /// A record of another type (TXT), with random data.
    Other(Vec<u8>),
}

/// How the server answers one query type.
#[derive(Debug, Clone)]
struct Answer {
    /// 0: NOERROR, 2: SERVFAIL, 3: NXDOMAIN.
    rcode: u8,
    ttl: u32,
    records: Vec<Record>,
}

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        3 => (any::<u16>(), any::<u16>(), any::<u16>(), 0u8..4).prop_map(
            |(priority, weight, port, target)| Record::Srv { priority: priority % 3, weight, port, target }
        ),
        2 => any::<u32>().prop_map(|a| Record::Addr(Ipv4Addr::from(a).into())),
        2 => any::<u128>().prop_map(|a| Record::Addr(Ipv6Addr::from(a).into())),
        1 => proptest::collection::vec(any::<u8>(), 0..20).prop_map(Record::Other),
    ]
}

fn answer() -> impl Strategy<Value = Answer> {
    (
        prop_oneof![8 => Just(0u8), 1 => Just(2u8), 1 => Just(3u8)],
        prop_oneof![Just(0u32), Just(30), any::<u32>()],
        proptest::collection::vec(record(), 0..8),
    )
        .prop_map(|(rcode, ttl, records)| Answer {
            rcode,
            ttl,
            records,
        })
}

fn name_bytes(name: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        b.push(label.len() as u8);
        b.extend_from_slice(label.as_bytes());
    }
    b.push(0);
    b
}

/// The response to `query` (a DNS message), from `answers`: one for SRV,
/// one for the targets' A/AAAA queries.
fn respond(query: &[u8], srv: &Answer, addrs: &Answer) -> Option<Vec<u8>> {
    // Header (12 bytes), then the question: name, type, class.
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += usize::from(query[end]) + 1;
    }
    let qtype = u16::from_be_bytes([*query.get(end + 1)?, *query.get(end + 2)?]);
    let question = &query[12..end + 5];
    let answer = if qtype == SRV { srv } else { addrs };
    let mut records = Vec::new();
    for r in &answer.records {
        let (rtype, data) = match r {
            Record::Srv {
                priority,
                weight,
                port,
                target,
            } => {
                let mut d = Vec::new();
                d.extend_from_slice(&priority.to_be_bytes());
                d.extend_from_slice(&weight.to_be_bytes());
                d.extend_from_slice(&port.to_be_bytes());
                d.extend(name_bytes(&format!("t{target}.example.")));
                (SRV, d)
            }
            Record::Addr(IpAddr::V4(a)) => (A, a.octets().to_vec()),
            Record::Addr(IpAddr::V6(a)) => (AAAA, a.octets().to_vec()),
            Record::Other(bytes) => {
                let mut d = vec![bytes.len().min(255) as u8];
                d.extend_from_slice(&bytes[..bytes.len().min(255)]);
                (TXT, d)
            }
        };
        records.push((rtype, data));
    }
    let mut m = Vec::new();
    m.extend_from_slice(&query[0..2]); // the query's id
    m.extend_from_slice(&[0x81, 0x80 | answer.rcode]); // response, RD, RA
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&(records.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(question);
    for (rtype, data) in records {
        m.extend_from_slice(&[0xc0, 12]); // the question's name
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&answer.ttl.to_be_bytes());
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend(data);
    }
    Some(m)
}

/// Resolves through the real provider against a server giving `srv` and
/// `addrs`: the provider's first report.
fn resolve(record: DnsRecord, v4: bool, srv: Answer, addrs: Answer) -> Result<Outcome, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let socket = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .map_err(|e| e.to_string())?,
        );
        let server_addr = socket.local_addr().map_err(|e| e.to_string())?;
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                if let Some(reply) = respond(&buf[..n], &srv, &addrs) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        let (tx, mut rx) = mpsc::channel(4);
        let reporter = Reporter {
            service: "svc".into(),
            generation: 1,
            tx,
        };
        let source = Source::Dns {
            name: "_svc._tcp.example.".into(),
            record,
            port: Some(8080),
            server: Some(server_addr),
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(10),
        };
        let vip: IpAddr = if v4 {
            Ipv4Addr::new(10, 0, 0, 1).into()
        } else {
            "fd00::1"
                .parse::<Ipv6Addr>()
                .expect("an IPv6 literal")
                .into()
        };
        let provider = tokio::spawn(dns::run(source, vip, reporter));
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        provider.abort();
        server.abort();
        if let Err(e) = provider.await
            && e.is_panic()
        {
            return Err("the DNS provider panicked".into());
        }
        match first {
            Ok(Some(report)) => Ok(report.outcome),
            Ok(None) => Err("the provider ended without a report".into()),
            Err(_) => Err("no report within 10 s".into()),
        }
    })
}

#[test]
fn the_server_serves_srv_answers_the_provider_reads() {
    let srv = Answer {
        rcode: 0,
        ttl: 30,
        records: vec![
            Record::Srv {
                priority: 0,
                weight: 5,
                port: 9000,
                target: 1,
            },
            // A lower preference: not used while priority 0 has targets.
            Record::Srv {
                priority: 1,
                weight: 1,
                port: 9001,
                target: 2,
            },
        ],
    };
    let addrs = Answer {
        rcode: 0,
        ttl: 30,
        records: vec![Record::Addr("10.0.0.7".parse().unwrap())],
    };
    match resolve(DnsRecord::Srv, true, srv, addrs) {
        Ok(Outcome::Backends(b)) => assert_eq!(b, vec![("10.0.0.7:9000".parse().unwrap(), 5)]),
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Each case is a resolution over loopback: fewer of them.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn fuzz_dns_answers(
        record in prop_oneof![Just(DnsRecord::Srv), Just(DnsRecord::A), Just(DnsRecord::Aaaa)],
        v4 in any::<bool>(),
        srv in answer(),
        addrs in answer(),
    ) {
        let outcome = resolve(record, v4, srv, addrs).map_err(TestCaseError::fail)?;
        match outcome {
            Outcome::Backends(backends) => {
                for (addr, weight) in backends {
                    if record == DnsRecord::Srv {
                        prop_assert_eq!(addr.is_ipv4(), v4, "{}", addr);
                        prop_assert!((1..=MAX_WEIGHT).contains(&weight), "{} weight {}", addr, weight);
                    } else {
                        prop_assert_eq!(addr.port(), 8080);
                    }
                }
            }
            Outcome::Failed(e) => {
                let text = e.to_string();
                prop_assert!(text.starts_with("_svc._tcp.example."), "{}", text);
            }
            Outcome::Services(_) => prop_assert!(false, "DNS reported services"),
        }
    }
}
