//! The kernel program on hand-built frames through BPF_PROG_TEST_RUN: exact
//! bytes out, checksums recomputed from scratch by the test.

use std::net::{IpAddr, SocketAddr};

use agent_common::reason;
use anyhow::Result;
use sluice_tests::{
    fib::{
        CLIENT_MAC, FibBed, T0_MAC, T1_MAC, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT,
        backend_mac, backend_of,
    },
    packet::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use testbed::Family;

const CLIENT_PORT: u16 = 40_000;

fn services(family: Family, snat: bool, backends: &[usize]) -> String {
    let mut text = String::from("services:\n");
    for proto in ["tcp", "udp"] {
        text += &format!(
            "  - name: s-{proto}\n    vip: \"{}\"\n    port: 80\n    protocol: {proto}\n",
            family.vip()
        );
        if snat {
            text += &format!("    forwarding: snat\n    snat_ip: \"{}\"\n", family.snat());
        }
        text += "    backends:\n";
        for &i in backends {
            text += &format!(
                "      - address: \"{}\"\n",
                SocketAddr::new(family.backend(i), 8080)
            );
        }
    }
    text
}

fn to_vip(family: Family, proto: u8, flags: u8) -> Pkt {
    let (c, v) = (family.client(), family.vip());
    if proto == 6 {
        Pkt::tcp(c, CLIENT_PORT, v, 80, flags)
    } else {
        Pkt::udp(c, CLIENT_PORT, v, 80)
    }
}

/// What the client's packet must look like after DNAT to backend `i`.
fn dnatted(p: &Pkt, family: Family, i: usize) -> Pkt {
    Pkt {
        dst: family.backend(i),
        dport: 8080,
        ttl: p.ttl - 1,
        smac: T0_MAC,
        dmac: backend_mac(i),
        ..p.clone()
    }
}

fn check_dnat_both_ways(family: Family, proto: u8, udp_no_checksum: bool) -> Result<()> {
    let mut bed = FibBed::new(&services(family, false, &[1]))?;
    let mut p = to_vip(family, proto, TCP_SYN);
    p.udp_no_checksum = udp_no_checksum;
    let (rc, out) = bed.run(&p.bytes())?;
    assert_eq!(rc, XDP_REDIRECT, "{family:?}/{proto}: forwarded");
    assert_eq!(
        out,
        dnatted(&p, family, 1).bytes(),
        "{family:?}/{proto}: DNAT bytes"
    );
    if udp_no_checksum {
        assert_eq!(
            &out[out.len() - p.payload.len() - 2..][..2],
            &[0, 0],
            "zero UDP checksum stays zero"
        );
    }

    // The backend's answer goes back with the VIP as its source.
    let mut reply = if proto == 6 {
        Pkt::tcp(
            family.backend(1),
            8080,
            family.client(),
            CLIENT_PORT,
            TCP_SYN | TCP_ACK,
        )
    } else {
        Pkt::udp(family.backend(1), 8080, family.client(), CLIENT_PORT)
    };
    reply.udp_no_checksum = udp_no_checksum;
    reply.smac = backend_mac(1);
    reply.dmac = T0_MAC;
    let (rc, out) = bed.run(&reply.bytes())?;
    assert_eq!(rc, XDP_REDIRECT, "{family:?}/{proto}: reply forwarded");
    let expected = Pkt {
        src: family.vip(),
        sport: 80,
        ttl: reply.ttl - 1,
        smac: T1_MAC,
        dmac: CLIENT_MAC,
        ..reply.clone()
    };
    assert_eq!(
        out,
        expected.bytes(),
        "{family:?}/{proto}: reverse NAT bytes"
    );
    Ok(())
}

#[test]
fn dnat_ipv4_tcp() -> Result<()> {
    check_dnat_both_ways(Family::V4, 6, false)
}

#[test]
fn dnat_ipv4_udp() -> Result<()> {
    check_dnat_both_ways(Family::V4, 17, false)
}

#[test]
fn dnat_ipv4_udp_without_checksum() -> Result<()> {
    check_dnat_both_ways(Family::V4, 17, true)
}

#[test]
fn dnat_ipv6_tcp() -> Result<()> {
    check_dnat_both_ways(Family::V6, 6, false)
}

#[test]
fn dnat_ipv6_udp() -> Result<()> {
    check_dnat_both_ways(Family::V6, 17, false)
}

fn check_snat(family: Family, proto: u8) -> Result<()> {
    let mut bed = FibBed::new(&services(family, true, &[2]))?;
    let p = to_vip(family, proto, TCP_SYN);
    let (rc, out) = bed.run(&p.bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    // The source port is the datapath's choice: read it, check its range,
    // then require every other byte to match.
    let l4 = if family == Family::V4 {
        14 + 20
    } else {
        14 + 40
    };
    let sport = u16::from_be_bytes([out[l4], out[l4 + 1]]);
    assert!((1024..=65535).contains(&sport), "SNAT port {sport}");
    let expected = Pkt {
        src: family.snat(),
        sport,
        ..dnatted(&p, family, 2)
    };
    assert_eq!(out, expected.bytes(), "SNAT bytes");

    let mut reply = if proto == 6 {
        Pkt::tcp(
            family.backend(2),
            8080,
            family.snat(),
            sport,
            TCP_SYN | TCP_ACK,
        )
    } else {
        Pkt::udp(family.backend(2), 8080, family.snat(), sport)
    };
    reply.smac = backend_mac(2);
    let (rc, out) = bed.run(&reply.bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    let expected = Pkt {
        src: family.vip(),
        sport: 80,
        dst: family.client(),
        dport: CLIENT_PORT,
        ttl: reply.ttl - 1,
        smac: T1_MAC,
        dmac: CLIENT_MAC,
        ..reply.clone()
    };
    assert_eq!(out, expected.bytes(), "SNAT reply bytes");

    // A second client flow gets a different port: no collisions.
    let other = Pkt {
        sport: CLIENT_PORT + 1,
        ..p.clone()
    };
    let (_, out2) = bed.run(&other.bytes())?;
    let sport2 = u16::from_be_bytes([out2[l4], out2[l4 + 1]]);
    assert_ne!(sport, sport2, "two flows share an SNAT port");
    Ok(())
}

#[test]
fn snat_ipv4_tcp() -> Result<()> {
    check_snat(Family::V4, 6)
}

#[test]
fn snat_ipv6_udp() -> Result<()> {
    check_snat(Family::V6, 17)
}

/// Which backend the output frame was sent to (by destination MAC).
#[test]
fn flows_stick_to_their_backend_when_the_set_changes() -> Result<()> {
    let family = Family::V4;
    let mut bed = FibBed::new(&services(family, false, &[0, 1, 2]))?;
    let mut chosen = Vec::new();
    for port in 0..30u16 {
        let p = Pkt {
            sport: 30_000 + port,
            ..to_vip(family, 6, TCP_SYN)
        };
        let (rc, out) = bed.run(&p.bytes())?;
        assert_eq!(rc, XDP_REDIRECT);
        chosen.push((p, backend_of(&out)));
    }
    let used: std::collections::BTreeSet<_> = chosen.iter().map(|(_, b)| *b).collect();
    assert_eq!(used.len(), 3, "30 flows over 3 backends use all of them");

    // Remove backend 0: every existing flow keeps its backend, for every
    // kind of later packet.
    bed.reconfigure(&services(family, false, &[1, 2]))?;
    for (p, backend) in &chosen {
        for flags in [TCP_ACK, TCP_ACK | TCP_FIN, TCP_RST] {
            let later = Pkt {
                tcp_flags: flags,
                ..p.clone()
            };
            let (rc, out) = bed.run(&later.bytes())?;
            assert_eq!(rc, XDP_REDIRECT);
            assert_eq!(out, dnatted(&later, family, *backend).bytes());
        }
    }
    // New flows avoid the removed backend.
    for port in 0..30u16 {
        let p = Pkt {
            sport: 50_000 + port,
            ..to_vip(family, 6, TCP_SYN)
        };
        let (_, out) = bed.run(&p.bytes())?;
        assert_ne!(
            backend_of(&out),
            0,
            "a new flow went to the removed backend"
        );
    }
    Ok(())
}

#[test]
fn traffic_not_for_a_service_passes_untouched() -> Result<()> {
    let mut bed = FibBed::new(&services(Family::V4, false, &[0]))?;
    let other: IpAddr = "10.100.0.9".parse()?;
    let cases = [
        Pkt::tcp(Family::V4.client(), 1234, other, 80, TCP_SYN),
        // The VIP, another port.
        Pkt::tcp(Family::V4.client(), 1234, Family::V4.vip(), 81, TCP_SYN),
        Pkt::udp(Family::V6.client(), 1234, "fd64::9".parse()?, 80),
        Pkt {
            frag: 0x2000,
            ..Pkt::udp(Family::V4.client(), 1, other, 80)
        },
        Pkt {
            ipv6_hop_by_hop: true,
            ..Pkt::udp(Family::V6.client(), 1, "fd64::9".parse()?, 80)
        },
    ];
    for p in cases {
        let frame = p.bytes();
        let (rc, out) = bed.run(&frame)?;
        assert_eq!(rc, XDP_PASS, "{p:?}");
        assert_eq!(out, frame, "non-VIP frame changed");
    }
    // ARP passes untouched too.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    assert_eq!(bed.run(&arp)?, (XDP_PASS, arp.clone()));
    for code in 0..reason::COUNT {
        assert_eq!(
            bed.reason(code),
            0,
            "reason {} counted for foreign traffic",
            reason::ALL[code as usize].name
        );
    }
    Ok(())
}

#[test]
fn what_the_datapath_cannot_handle_is_counted_by_reason() -> Result<()> {
    let mut bed = FibBed::new(&services(Family::V4, false, &[0]))?;
    let mut bed6 = FibBed::new(&services(Family::V6, false, &[0]))?;
    let v4 = to_vip(Family::V4, 6, TCP_SYN);
    let v6 = to_vip(Family::V6, 17, 0);

    let cases = [
        (
            false,
            Pkt {
                vlan: Some(100),
                ..v4.clone()
            },
            XDP_PASS,
            reason::VLAN_TAGGED,
        ),
        (
            // A later fragment whose first fragment wasn't seen: nothing
            // proves it is Sluice's, so it passes (counted).
            false,
            Pkt {
                frag: 0x0010,
                ..v4.clone()
            },
            XDP_PASS,
            reason::FRAGMENT,
        ),
        (
            false,
            Pkt {
                ttl: 1,
                ..v4.clone()
            },
            XDP_PASS,
            reason::TTL_EXCEEDED,
        ),
    ];
    for (ipv6, p, want_rc, code) in cases {
        let bed = if ipv6 { &mut bed6 } else { &mut bed };
        let before = bed.reason(code);
        let frame = p.bytes();
        let (rc, out) = bed.run(&frame)?;
        let name = reason::ALL[code as usize].name;
        assert_eq!(rc, want_rc, "{name}");
        if want_rc == XDP_PASS {
            // Untouched, TTL-expired ones too: the kernel's ICMP error must
            // quote what the client sent.
            assert_eq!(out, frame, "{name}: passed frames are untouched");
        }
        assert_eq!(bed.reason(code), before + 1, "{name} counted once");
    }

    // An IPv6 extension header the datapath doesn't parse (AH): passed
    // untouched, counted.
    let mut ah = v6.bytes();
    ah[20] = 51;
    let before = bed6.reason(reason::IPV6_EXTENSION);
    assert_eq!(bed6.run(&ah)?, (XDP_PASS, ah.clone()));
    assert_eq!(bed6.reason(reason::IPV6_EXTENSION), before + 1);

    // Bad IPv4 lengths: header length below 5 words (no ports to look the
    // packet up by: passed); total length shorter than the headers, or
    // beyond the frame (the service lookup says it is Sluice's: dropped).
    for (offset, value, want_rc, code) in [
        (14usize, vec![0x44u8], XDP_PASS, reason::MALFORMED),
        (
            16,
            20u16.to_be_bytes().to_vec(),
            XDP_DROP,
            reason::BAD_LENGTH,
        ),
        (
            16,
            1500u16.to_be_bytes().to_vec(),
            XDP_DROP,
            reason::BAD_LENGTH,
        ),
    ] {
        let mut f = v4.bytes();
        f[offset..offset + value.len()].copy_from_slice(&value);
        let before = bed.reason(code);
        assert_eq!(bed.run(&f)?.0, want_rc, "bad length at {offset}");
        assert_eq!(bed.reason(code), before + 1);
    }
    Ok(())
}

/// A datagram's first fragment is balanced like a whole one; its later
/// fragments (no UDP header) follow it to the same backend by the ports the
/// first one left, keyed by the IP identification. IPv6 hop-by-hop options
/// in front of the transport header are stepped over.
#[test]
fn fragments_follow_their_first_and_extension_headers_are_parsed() -> Result<()> {
    let family = Family::V4;
    let mut bed = FibBed::new(&services(family, false, &[0, 1, 2]))?;
    // 30 datagrams from as many source ports, each with its own
    // identification: all first fragments, then all later ones, so that
    // each later fragment must find its own first among the 30.
    let datagrams: Vec<Pkt> = (0..30u16)
        .map(|k| Pkt {
            sport: 30_000 + k,
            ip_id: 0x4000 + k,
            ..to_vip(family, 17, 0)
        })
        .collect();
    let mut firsts = Vec::new();
    for udp in &datagrams {
        let first = Pkt {
            frag: 0x2000, // more fragments, offset 0
            ..udp.clone()
        };
        let (rc, out) = bed.run(&first.bytes())?;
        assert_eq!(rc, XDP_REDIRECT, "first fragment of {}", udp.sport);
        let backend = backend_of(&out);
        assert_eq!(
            out,
            dnatted(&first, family, backend).bytes(),
            "first fragment of {}: DNAT bytes",
            udp.sport
        );
        firsts.push(backend);
    }
    let used: std::collections::BTreeSet<_> = firsts.iter().collect();
    assert_eq!(
        used.len(),
        3,
        "30 datagrams over 3 backends use all of them"
    );
    for (udp, &backend) in datagrams.iter().zip(&firsts) {
        let later = Pkt {
            frag: 0x0010, // offset 128 bytes, the last fragment
            ..udp.clone()
        };
        // Where a header would hold ports, a later fragment holds payload:
        // what is there (here another source port to the service's port)
        // must not steer it.
        let mut frame = later.bytes();
        frame[34..36].copy_from_slice(&(udp.sport ^ 0x5a5a).to_be_bytes());
        frame[36..38].copy_from_slice(&80u16.to_be_bytes());
        let (rc, out) = bed.run(&frame)?;
        assert_eq!(
            rc, XDP_REDIRECT,
            "later fragment of {}: forwarded",
            udp.sport
        );
        assert_eq!(
            backend_of(&out),
            backend,
            "later fragment of {}: the first fragment's backend",
            udp.sport
        );
        // Its IP header DNATed like the first's (addresses, TTL, checksum);
        // its payload, which is not an L4 header, untouched.
        let expected = dnatted(&later, family, backend).bytes();
        assert_eq!(
            out[..34],
            expected[..34],
            "later fragment of {}: IP header",
            udp.sport
        );
        assert_eq!(
            out[34..],
            frame[34..],
            "later fragment of {}: payload untouched",
            udp.sport
        );
    }
    let mut other = Pkt {
        frag: 0x0010,
        ..datagrams[0].clone()
    }
    .bytes();
    other[18] ^= 0xff; // another datagram's identification
    let before = bed.reason(reason::FRAGMENT);
    assert_eq!(bed.run(&other)?, (XDP_PASS, other.clone()));
    assert_eq!(bed.reason(reason::FRAGMENT), before + 1);

    let mut bed6 = FibBed::new(&services(Family::V6, false, &[0]))?;
    let hop_by_hop = Pkt {
        ipv6_hop_by_hop: true,
        ..to_vip(Family::V6, 17, 0)
    };
    let (rc, out) = bed6.run(&hop_by_hop.bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(
        out,
        dnatted(&hop_by_hop, Family::V6, 0).bytes(),
        "hop-by-hop: DNAT bytes, the extension header kept"
    );
    Ok(())
}

#[test]
fn ipv4_options_are_forwarded_intact() -> Result<()> {
    let mut bed = FibBed::new(&services(Family::V4, false, &[0]))?;
    // A record-route-free NOP, NOP, NOP, EOL option block.
    let p = Pkt {
        ip_options: vec![1, 1, 1, 0],
        ..to_vip(Family::V4, 6, TCP_SYN)
    };
    let (rc, out) = bed.run(&p.bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(out, dnatted(&p, Family::V4, 0).bytes());
    Ok(())
}

/// Every prefix of a frame for the VIP: shorter than the IP addresses, or
/// than the ports → passed (nothing exact says it is ours); anything longer
/// but cut → dropped and counted.
#[test]
fn frames_truncated_at_every_length() -> Result<()> {
    for (family, proto) in [
        (Family::V4, 6),
        (Family::V4, 17),
        (Family::V6, 6),
        (Family::V6, 17),
    ] {
        let mut bed = FibBed::new(&services(family, false, &[0]))?;
        let frame = to_vip(family, proto, TCP_SYN).bytes();
        let ip_end = if family == Family::V4 {
            14 + 20
        } else {
            14 + 40
        };
        let l4_len = if proto == 6 { 20 } else { 8 };
        for len in 0..frame.len() {
            let cut = &frame[..len];
            let (code, want_rc) = if len < ip_end {
                (reason::SHORT_FRAME, XDP_PASS)
            } else if len < ip_end + 4 {
                // No ports: no exact lookup says it is Sluice's.
                (reason::MALFORMED, XDP_PASS)
            } else if len < ip_end + l4_len {
                (reason::TRUNCATED, XDP_DROP)
            } else {
                (reason::BAD_LENGTH, XDP_DROP)
            };
            // Frames shorter than an Ethernet header are refused by the
            // kernel's test runner itself.
            if len < 14 {
                continue;
            }
            let before = bed.reason(code);
            let (rc, out) = bed.run(cut)?;
            assert_ne!(rc, XDP_ABORTED);
            assert_eq!(rc, want_rc, "{family:?}/{proto} cut at {len}");
            if want_rc == XDP_PASS {
                assert_eq!(out, cut, "{family:?}/{proto} cut at {len}: changed");
            }
            assert_eq!(
                bed.reason(code),
                before + 1,
                "{family:?}/{proto} cut at {len}: counted"
            );
        }
    }
    Ok(())
}

#[test]
fn a_service_without_backends_drops_and_counts() -> Result<()> {
    let mut bed = FibBed::new(&services(Family::V4, false, &[]))?;
    let (rc, _) = bed.run(&to_vip(Family::V4, 6, TCP_SYN).bytes())?;
    assert_eq!(rc, XDP_DROP);
    assert_eq!(bed.reason(reason::NO_BACKEND), 1);
    Ok(())
}

/// dnat: the same client port towards two VIPs that share a backend would
/// give both flows one reply tuple; the second is refused, not mistranslated.
#[test]
fn a_reply_tuple_is_never_shared_by_two_flows() -> Result<()> {
    let family = Family::V4;
    let backend = SocketAddr::new(family.backend(0), 8080);
    let text = format!(
        "services:\n  - name: a\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    backends:\n      - address: {backend}\n  - name: b\n    vip: 10.100.0.2\n    port: 80\n    protocol: tcp\n    backends:\n      - address: {backend}\n"
    );
    let mut bed = FibBed::new(&text)?;
    let first = Pkt::tcp(
        family.client(),
        CLIENT_PORT,
        "10.100.0.1".parse()?,
        80,
        TCP_SYN,
    );
    assert_eq!(bed.run(&first.bytes())?.0, XDP_REDIRECT);
    let second = Pkt {
        dst: "10.100.0.2".parse()?,
        ..first.clone()
    };
    assert_eq!(bed.run(&second.bytes())?.0, XDP_DROP);
    assert_eq!(bed.reason(reason::REPLY_CONFLICT), 1);
    // The first flow's replies still come from its own VIP.
    let reply = Pkt {
        smac: backend_mac(0),
        ..Pkt::tcp(
            family.backend(0),
            8080,
            family.client(),
            CLIENT_PORT,
            TCP_SYN | TCP_ACK,
        )
    };
    let (rc, out) = bed.run(&reply.bytes())?;
    assert_eq!(rc, XDP_REDIRECT);
    assert_eq!(
        &out[26..30],
        &[10, 100, 0, 1],
        "source rewritten to the first VIP"
    );
    Ok(())
}

/// The agent reads the conntrack tables in batches (the sweep, 4,096
/// entries a syscall): every entry of a table several batches long is
/// read once, the same as a key-by-key walk finds it.
#[test]
fn a_batch_read_of_a_conntrack_table_finds_every_entry_once() -> Result<()> {
    use agent_common::{Flow, FlowKey};
    use aya::maps::IterableMap as _;

    let bed = FibBed::with_conntrack(&services(Family::V4, false, &[0]), 65_536)?;
    // A handle of its own on the bed's table, as the agent's sweep has.
    let mut table = bed.reconciler.read_tables()?.conntrack;
    let n: u32 = 10_000;
    for i in 0..n {
        let key = FlowKey {
            src: [
                u32::from_be_bytes([10, 9, (i >> 8) as u8, i as u8]),
                0,
                0,
                0,
            ],
            sport: (i as u16).to_be(),
            dport: 80u16.to_be(),
            proto: agent_common::PROTO_TCP,
            family: agent_common::FAMILY_V4,
            ..FlowKey::default()
        };
        let flow = Flow {
            backend_id: i,
            ..Flow::default()
        };
        table.insert(key, flow, 0)?;
    }
    let batched = sluice::batch::hash_entries::<FlowKey, Flow>(table.map(), usize::MAX)?;
    let mut walked: Vec<(FlowKey, Flow)> = table.iter().collect::<Result<_, _>>()?;
    let mut read: Vec<(FlowKey, Flow)> = batched.clone();
    let order = |a: &(FlowKey, Flow), b: &(FlowKey, Flow)| a.1.backend_id.cmp(&b.1.backend_id);
    walked.sort_by(order);
    read.sort_by(order);
    assert_eq!(batched.len(), n as usize, "every entry, none twice");
    assert_eq!(read, walked, "the same entries as a key-by-key walk");
    assert_eq!(
        sluice::batch::hash_entries::<FlowKey, Flow>(table.map(), 5_000)?.len(),
        5_000,
        "the limit holds"
    );
    Ok(())
}
