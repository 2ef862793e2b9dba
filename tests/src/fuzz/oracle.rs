//! The oracle: for each packet, what the datapath did must be one of
//! - passed untouched (maybe counted under a reason that passes);
//! - dropped, with exactly one reason that drops counted once;
//! - forwarded (TX/REDIRECT) as a valid rewrite: to a configured backend of
//!   the service whose VIP it was sent to (the source kept, or the service's
//!   SNAT address), or, from a backend, to a client that sent to that
//!   service with the VIP as source; every other byte kept but the TTL (one
//!   less) and the MACs (the next hop's); for a DSR service, every address
//!   and port kept, to the MAC of one of its backends (never passed: the
//!   kernel would route it by the VIP); checksums that verify, recomputed
//!   here from scratch (or, for input that was already wrong, wrong by the
//!   same amount: a forwarder must neither hide nor add corruption);
//! - passed rewritten, only with a counted reason (the FIB had no neighbour:
//!   the kernel forwards it), the same rewrite without the TTL and MACs;
//! - passed as a translated ICMP error: a "too big" message about a flow,
//!   now quoting the packet as the client sent it, and addressed to it.
//!
//! Everything is judged against the configured world and this module's own
//! reading of the bytes (`wire`), never by asking the datapath's code.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    ops::Range,
};

use agent_common::reason;

use super::{
    generate::{Flow, Program},
    wire::{self, IpView, be16, parse, pseudo_sum, sum, verifies},
    world::{Service, Side, TCP, UDP, World},
};

/// Failures whose cause the oracle can name: each is one datapath defect
/// (see docs/fuzzing.md), so that a run can tell it apart from new ones.
pub mod finding {
    /// An IPv4/IPv6 frame whose IP version field contradicts its Ethernet
    /// type, rewritten and forwarded (the IP stack would drop it).
    pub const IP_VERSION: &str = "ip-version";
    /// An IPv6 packet with more than one fragment header, the transport
    /// header read where a non-first fragment's payload is.
    pub const IPV6_FRAGMENT_HEADERS: &str = "ipv6-fragment-headers";
    /// Bytes past the IP packet's own end (Ethernet padding) rewritten, as
    /// the quoted checksum of a translated ICMP error.
    pub const PAST_IP_END: &str = "past-ip-end";
    /// One packet counted under more than one reason (everything else
    /// about it right): the per-reason totals no longer add up to packets,
    /// and a packet dropped or forwarded shows in a total of passes.
    pub const SEVERAL_REASONS: &str = "several-reasons";
    pub const ALL: &[&str] = &[
        IP_VERSION,
        IPV6_FRAGMENT_HEADERS,
        PAST_IP_END,
        SEVERAL_REASONS,
    ];
}

/// Why an output was refused, and the named defect it shows, if known.
#[derive(Debug)]
pub struct Refusal {
    pub why: String,
    pub finding: Option<&'static str>,
}

/// The named defect a refused packet shows, if any.
fn diagnose(input: &[u8], out: &[u8]) -> Option<&'static str> {
    if wire::wrong_version(input).is_some() {
        return Some(finding::IP_VERSION);
    }
    let v = parse(input)?;
    if v.v6 && v.fragment_headers > 1 {
        return Some(finding::IPV6_FRAGMENT_HEADERS);
    }
    let end = v.ip_end.min(input.len());
    if out.len() == input.len() && input[end..] != out[end..] {
        return Some(finding::PAST_IP_END);
    }
    None
}

fn reason_name(code: usize) -> &'static str {
    reason::ALL
        .get(code)
        .map(|r| r.name)
        .unwrap_or("(unknown code)")
}

fn dropping(code: usize) -> bool {
    reason::ALL.get(code).is_some_and(|r| r.dropped)
}

/// What the program returned, in XDP's terms (TC's mapped onto them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    Tx,
    Redirect,
    Aborted,
    Other(u32),
}

/// The oracle's judgement of one packet: its class (for the report), and a
/// flow to tell the generator about.
#[derive(Debug)]
pub struct Judgement {
    pub class: String,
    pub flow: Option<Flow>,
    /// Checksums of the input that verified and were verified again, from
    /// scratch, on the output.
    pub verified: u32,
    /// Checksums of the input that were wrong and stayed wrong by the same
    /// amount.
    pub kept_wrong: u32,
}

impl Judgement {
    fn class(class: impl Into<String>) -> Self {
        Self {
            class: class.into(),
            flow: None,
            verified: 0,
            kept_wrong: 0,
        }
    }
}

/// The configured world, and which clients sent to which service (a reply
/// may go only to one of them).
pub struct Oracle {
    world: World,
    sent: HashMap<usize, HashSet<SocketAddr>>,
}

impl Default for Oracle {
    fn default() -> Self {
        Self::new()
    }
}

impl Oracle {
    pub fn new() -> Self {
        Self {
            world: World::standard(),
            sent: HashMap::new(),
        }
    }

    /// Notes who sent `input` to which service, before it is judged. Read
    /// liberally (any IP version field; the first bytes after the headers
    /// as ports even in what the oracle takes for a later fragment): the
    /// set must hold every client that addressed a service in any reading.
    pub fn record(&mut self, input: &[u8]) {
        let Some(v) = wire::parse_lenient(input) else {
            return;
        };
        if !matches!(v.proto, TCP | UDP) {
            return;
        }
        let (Some(sport), Some(dport)) = (be16(input, v.l4), be16(input, v.l4 + 2)) else {
            return;
        };
        for (i, s) in self.world.services.iter().enumerate() {
            if s.vip == v.dst && s.port == dport && s.proto == v.proto {
                self.sent
                    .entry(i)
                    .or_default()
                    .insert(SocketAddr::new(v.src, sport));
            }
        }
    }

    fn service_index(&self, s: &Service) -> usize {
        self.world
            .services
            .iter()
            .position(|x| x.name == s.name)
            .expect("a service of the world")
    }

    fn sent_to(&self, s: &Service, client: SocketAddr) -> bool {
        self.sent
            .get(&self.service_index(s))
            .is_some_and(|c| c.contains(&client))
    }

    fn sent_from_ip(&self, s: &Service, client: IpAddr) -> bool {
        self.sent
            .get(&self.service_index(s))
            .is_some_and(|c| c.iter().any(|a| a.ip() == client))
    }

    /// Judges one packet: `counted` is how much each reason's counter grew.
    pub fn judge(
        &self,
        input: &[u8],
        ingress: Side,
        program: Program,
        verdict: Verdict,
        out: &[u8],
        counted: &[u64],
    ) -> Result<Judgement, Refusal> {
        let grown: Vec<(usize, u64)> = counted
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i, *n))
            .collect();
        if grown.len() > 1 || grown.iter().any(|(_, n)| *n > 1) {
            // Refused, but judged for everything else too, as if only the
            // reason that fits the verdict (the one that drops, for a drop)
            // were counted: the run tells this defect from any other.
            let list: Vec<String> = grown
                .iter()
                .map(|(c, n)| format!("{} +{n}", reason_name(*c)))
                .collect();
            let list = list.join(", ");
            let fits = |code: usize| dropping(code) == (verdict == Verdict::Drop);
            let mut one = vec![0; counted.len()];
            if let Some((code, _)) = grown.iter().find(|(c, _)| fits(*c)).or(grown.first()) {
                one[*code] = 1;
            }
            return match self.judge_bytes(input, ingress, program, verdict, out, &one) {
                Ok(_) => Err(Refusal {
                    why: format!("more than one count for one packet: {list}"),
                    finding: Some(finding::SEVERAL_REASONS),
                }),
                Err(why) => Err(Refusal {
                    why: format!("{why} (counted: {list})"),
                    finding: diagnose(input, out),
                }),
            };
        }
        self.judge_bytes(input, ingress, program, verdict, out, counted)
            .map_err(|why| Refusal {
                finding: diagnose(input, out),
                why,
            })
    }

    fn judge_bytes(
        &self,
        input: &[u8],
        ingress: Side,
        program: Program,
        verdict: Verdict,
        out: &[u8],
        counted: &[u64],
    ) -> Result<Judgement, String> {
        let grown: Vec<usize> = (0..counted.len()).filter(|&c| counted[c] > 0).collect();
        let name = reason_name;
        let drops = dropping;
        let reason = grown.first().copied();
        match verdict {
            Verdict::Aborted => Err("aborted (XDP_ABORTED)".into()),
            Verdict::Other(rc) => Err(format!("unexpected return code {rc}")),
            Verdict::Drop => match reason {
                None => Err("dropped without a counted reason".into()),
                Some(code) if !drops(code) => Err(format!(
                    "dropped, but the reason counted ({}) is one that passes",
                    name(code)
                )),
                Some(code) => Ok(Judgement::class(format!("dropped: {}", name(code)))),
            },
            Verdict::Pass => {
                if let Some(code) = reason
                    && drops(code)
                {
                    return Err(format!(
                        "passed, but the reason counted ({}) is one that drops",
                        name(code)
                    ));
                }
                if out == input {
                    // Said apart: TCP/UDP addressed to a service's VIP and
                    // port that the datapath left to the kernel uncounted.
                    let to_service = parse(input).is_some_and(|v| {
                        v.ports(input).is_some_and(|(_, dport)| {
                            self.world
                                .services_at(v.dst, Some(dport), v.proto)
                                .next()
                                .is_some()
                        })
                    });
                    return Ok(Judgement::class(match (reason, to_service) {
                        (None, false) => "passed untouched".to_string(),
                        (None, true) => "passed untouched, to a service".to_string(),
                        (Some(code), _) => format!("passed untouched, counted: {}", name(code)),
                    }));
                }
                let v = parse(input).ok_or("passed changed, and it isn't IP")?;
                if matches!(v.proto, wire::PROTO_ICMP | wire::PROTO_ICMPV6) {
                    return self.icmp_translation(input, out);
                }
                let Some(code) = reason else {
                    return Err(format!(
                        "passed with changed bytes and no counted reason ({})",
                        first_difference(input, out)
                    ));
                };
                let mut j = self.rewrite(input, out, None, ingress, program)?;
                j.class = format!("passed {}, counted: {}", j.class, name(code));
                Ok(j)
            }
            Verdict::Tx | Verdict::Redirect => {
                if let Some(code) = reason
                    && drops(code)
                {
                    return Err(format!(
                        "forwarded, but the reason counted ({}) is one that drops",
                        name(code)
                    ));
                }
                let mut j = self.rewrite(input, out, Some(verdict), ingress, program)?;
                if let Some(code) = reason {
                    j.class = format!("{}, counted: {}", j.class, name(code));
                }
                Ok(j)
            }
        }
    }

    /// A rewrite: forwarded (`verdict` TX/REDIRECT: TTL and MACs change) or
    /// passed to the kernel (`verdict` None: they don't).
    fn rewrite(
        &self,
        input: &[u8],
        out: &[u8],
        verdict: Option<Verdict>,
        ingress: Side,
        program: Program,
    ) -> Result<Judgement, String> {
        if let Some((expected, got)) = wire::wrong_version(input) {
            return Err(format!(
                "rewrote a frame whose IP version field says {got} (its Ethernet type: IPv{expected})"
            ));
        }
        let vin = parse(input).ok_or("rewrote a frame that isn't IP")?;
        let vout = parse(out).ok_or("the output is no longer IP")?;
        if out.len() != input.len() {
            return Err(format!(
                "length changed: {} → {} bytes",
                input.len(),
                out.len()
            ));
        }
        if (vin.proto, vin.l4, vin.later_fragment) != (vout.proto, vout.l4, vout.later_fragment) {
            return Err("the headers' structure changed".into());
        }
        if !matches!(vin.proto, TCP | UDP) {
            return Err(format!("rewrote a packet of protocol {}", vin.proto));
        }
        let alen = if vin.v6 { 16 } else { 4 };
        let ports_in = vin.ports(input);
        let mut allowed: Vec<Range<usize>> =
            vec![vin.src_at..vin.src_at + alen, vin.dst_at..vin.dst_at + alen];
        if verdict.is_some() {
            allowed.push(0..12);
            allowed.push(vin.ttl_at..vin.ttl_at + 1);
        }
        if !vin.v6 {
            allowed.push(vin.l3 + 10..vin.l3 + 12);
        }
        let check_at = vin.l4_check_at().expect("TCP or UDP");
        if ports_in.is_some() {
            allowed.push(vin.l4..vin.l4 + 4);
            allowed.push(check_at..check_at + 2);
        }
        only_changed(input, out, &allowed)?;

        // TTL: one less when forwarded (and then it must have been above 1).
        if verdict.is_some() {
            if vin.ttl <= 1 {
                return Err(format!("forwarded with TTL/hop limit {}", vin.ttl));
            }
            if vout.ttl != vin.ttl - 1 {
                return Err(format!("TTL {} → {}, not one less", vin.ttl, vout.ttl));
            }
        }

        let ports_out = vout.ports(out);
        let sock = |ip: IpAddr, p: Option<(u16, u16)>, src: bool| {
            p.map(|(s, d)| SocketAddr::new(ip, if src { s } else { d }))
        };
        let (src_in, dst_in) = (
            sock(vin.src, ports_in, true),
            sock(vin.dst, ports_in, false),
        );
        let (src_out, dst_out) = (
            sock(vout.src, ports_out, true),
            sock(vout.dst, ports_out, false),
        );
        let dport = ports_in.map(|p| p.1);
        let sport = ports_in.map(|p| p.0);

        let mut direction = None;
        // Where the frame must be going: its IP destination, but for direct
        // server return, which keeps the VIP and sends to a backend by MAC.
        let mut hop = vout.dst;
        // To a service: the destination becomes one of its backends.
        for s in self.world.services_at(vin.dst, dport, vin.proto) {
            if s.dsr {
                // Direct server return: every address and port kept, the
                // frame forwarded (never handed to the kernel, which would
                // route it by the VIP) to the MAC of one of its backends.
                let kept = vout.src == vin.src
                    && vout.dst == vin.dst
                    && src_out == src_in
                    && dst_out == dst_in;
                let Some(backend) = self.world.neighbour_by_mac(&out[0..6], vin.v6) else {
                    continue;
                };
                let to = SocketAddr::new(backend, s.port);
                let backend_ok = match dport {
                    Some(_) => s.has_backend(&to),
                    None => s.has_backend_ip(backend),
                };
                if kept && verdict.is_some() && backend_ok {
                    if dport.is_some() && s.weight_of(&to) == Some(0) {
                        return Err(format!(
                            "service {}: sent to drained backend {to} (weight 0)",
                            s.name
                        ));
                    }
                    hop = backend;
                    direction = Some((s, true));
                    break;
                }
                continue;
            }
            let backend_ok = match dst_out {
                Some(d) => s.has_backend(&d),
                None => s.has_backend_ip(vout.dst),
            };
            let source_ok = match s.snat {
                None => vout.src == vin.src && src_out == src_in,
                Some(snat) => vout.src == snat && src_out.is_none_or(|a| a.port() != 0),
            };
            if backend_ok && source_ok {
                if let Some(d) = dst_out
                    && s.weight_of(&d) == Some(0)
                {
                    return Err(format!(
                        "service {}: sent to drained backend {d} (weight 0)",
                        s.name
                    ));
                }
                direction = Some((s, true));
                break;
            }
        }
        // From a backend: the source becomes the VIP, the destination a
        // client that sent to that service.
        if direction.is_none() {
            // (Never a DSR service's: its replies don't come this way.)
            for s in self
                .world
                .services_of_backend(vin.src, sport, vin.proto)
                .filter(|s| !s.dsr)
            {
                let vip_ok = vout.src == s.vip
                    && sport.is_none_or(|_| src_out.map(|a| a.port()) == Some(s.port));
                let client_ok = match (s.snat, dst_out) {
                    (None, Some(d)) => {
                        vout.dst == vin.dst && dst_out == dst_in && self.sent_to(s, d)
                    }
                    (None, None) => vout.dst == vin.dst && self.sent_from_ip(s, vout.dst),
                    (Some(snat), Some(d)) => vin.dst == snat && self.sent_to(s, d),
                    (Some(snat), None) => vin.dst == snat && self.sent_from_ip(s, vout.dst),
                };
                if vip_ok && client_ok {
                    direction = Some((s, false));
                    break;
                }
            }
        }
        let Some((service, to_backend)) = direction else {
            return Err(format!(
                "not a valid rewrite: {} → {} became {} → {}",
                show(vin.src, src_in),
                show(vin.dst, dst_in),
                show(vout.src, src_out),
                show(vout.dst, dst_out)
            ));
        };

        if let Some(verdict) = verdict {
            next_hop(&self.world, out, hop, verdict, ingress, program)?;
        }
        let how = match verdict {
            Some(Verdict::Tx) => "forwarded (XDP_TX)",
            Some(_) => "forwarded",
            None => "rewritten",
        };
        let way = if to_backend {
            "to a backend"
        } else {
            "reply to a client"
        };
        let mode = if service.dsr {
            "dsr"
        } else if service.snat.is_some() {
            "snat"
        } else {
            "dnat"
        };
        let mut j = Judgement::class(format!("{how} {way} ({mode})"));
        checksums(input, out, &vin, &vout, &mut j)?;
        // A DSR flow's backend is the one its MAC named.
        let dst_out = if service.dsr {
            dst_out.map(|d| SocketAddr::new(hop, d.port()))
        } else {
            dst_out
        };
        if to_backend
            && let (Some(client), Some(from), Some(backend)) = (src_in, src_out, dst_out)
            && let Some(vip) = dst_in
        {
            j.flow = Some(Flow {
                proto: vin.proto,
                client,
                vip,
                from,
                backend,
            });
        }
        Ok(j)
    }

    /// A passed ICMP error whose bytes changed: it must be a translation of
    /// a quote of a packet sent to a backend into the packet the client
    /// sent, sent on to that client.
    fn icmp_translation(&self, input: &[u8], out: &[u8]) -> Result<Judgement, String> {
        let vin = parse(input).ok_or("ICMP: input not IP")?;
        let vout = parse(out).ok_or("ICMP: output not IP")?;
        if out.len() != input.len() || vin.l4 != vout.l4 || vin.proto != vout.proto {
            return Err("ICMP error changed in length or structure".into());
        }
        let qin = wire::quote(input, &vin).ok_or("ICMP changed, but it quotes no IP header")?;
        let qout = wire::quote(out, &vout).ok_or("ICMP: output quote unreadable")?;
        if !matches!(qin.proto, TCP | UDP) || qin.v6 != vin.v6 {
            return Err(format!(
                "ICMP changed, but it quotes protocol {} (IPv{})",
                qin.proto,
                if qin.v6 { 6 } else { 4 }
            ));
        }
        let alen = if vin.v6 { 16 } else { 4 };
        let mut allowed: Vec<Range<usize>> = vec![
            vin.dst_at..vin.dst_at + alen,
            vin.l4 + 2..vin.l4 + 4,
            qin.at + if vin.v6 { 8 } else { 12 }..qin.at + if vin.v6 { 40 } else { 20 },
            qin.l4..qin.l4 + 4,
        ];
        if !vin.v6 {
            allowed.push(vin.l3 + 10..vin.l3 + 12);
            allowed.push(qin.at + 10..qin.at + 12);
        }
        let inner_check = qin.l4 + if qin.proto == TCP { 16 } else { 6 };
        allowed.push(inner_check..inner_check + 2);
        only_changed(input, out, &allowed)?;

        let (Some((xp, bp)), Some((cp, vp))) = (qin.ports(input), qout.ports(out)) else {
            return Err("ICMP changed, but the quote has no ports".into());
        };
        let quoted_from = SocketAddr::new(qin.src, xp);
        let client = SocketAddr::new(qout.src, cp);
        let service = self
            .world
            .services_of_backend(qin.dst, Some(bp), qin.proto)
            .find(|s| {
                s.vip == qout.dst
                    && s.port == vp
                    && match s.snat {
                        None => client == quoted_from,
                        Some(snat) => qin.src == snat,
                    }
                    && self.sent_to(s, client)
            })
            .ok_or_else(|| {
                format!(
                    "ICMP quote {} → {}:{bp} translated to {client} → {}:{vp}: not a flow \
                     of a configured service",
                    quoted_from, qin.dst, qout.dst
                )
            })?;
        if vout.dst != client.ip() {
            return Err(format!(
                "ICMP translated for {client} but sent to {}",
                vout.dst
            ));
        }
        let mut j = Judgement::class(format!(
            "passed, ICMP error translated ({})",
            if service.snat.is_some() {
                "snat"
            } else {
                "dnat"
            }
        ));
        // The outer IPv4 header, the ICMP message, the quoted IPv4 header
        // and the quoted transport checksum.
        if let (Some(a), Some(b)) = (vin.v4_header(input), vout.v4_header(out)) {
            sum_field(input, out, a, b, 10, 0, 0, false, "IPv4 header", &mut j)?;
        }
        let end = vin.ip_end.min(input.len());
        if end >= vin.l4 + 4 {
            let len = (vin.ip_end.saturating_sub(vin.l4)) as u32;
            let (pin, pout) = if vin.v6 {
                (
                    pseudo_sum(vin.src, vin.dst, wire::PROTO_ICMPV6, len),
                    pseudo_sum(vout.src, vout.dst, wire::PROTO_ICMPV6, len),
                )
            } else {
                (0, 0)
            };
            let whole = vin.ip_end <= input.len();
            sum_field(
                input,
                out,
                vin.l4..end,
                vout.l4..end,
                2,
                pin,
                pout,
                whole,
                "ICMP",
                &mut j,
            )?;
        }
        if !qin.v6 && qin.header_len >= 20 && qin.at + qin.header_len <= end {
            let r = qin.at..qin.at + qin.header_len;
            sum_field(
                input,
                out,
                r.clone(),
                r,
                10,
                0,
                0,
                false,
                "quoted IPv4 header",
                &mut j,
            )?;
        }
        if inner_check + 2 <= end {
            let (cin, cout) = (be16(input, inner_check), be16(out, inner_check));
            if qin.proto == UDP && !qin.v6 && cin == Some(0) {
                if cout != Some(0) {
                    return Err("quoted UDP checksum 0 (none) was changed".into());
                }
            } else {
                let pin = pseudo_sum(qin.src, qin.dst, qin.proto, 0);
                let pout = pseudo_sum(qout.src, qout.dst, qout.proto, 0);
                sum_field(
                    input,
                    out,
                    qin.l4..end,
                    qout.l4..end,
                    inner_check - qin.l4,
                    pin,
                    pout,
                    false,
                    "quoted transport",
                    &mut j,
                )?;
            }
        }
        Ok(j)
    }
}

fn show(ip: IpAddr, sock: Option<SocketAddr>) -> String {
    sock.map(|s| s.to_string())
        .unwrap_or_else(|| ip.to_string())
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("length {} → {}", a.len(), b.len());
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first change at byte {i}: {:02x} → {:02x}", a[i], b[i]),
        None => "identical".into(),
    }
}

/// Every byte outside `allowed` is the same in both.
fn only_changed(input: &[u8], out: &[u8], allowed: &[Range<usize>]) -> Result<(), String> {
    for (i, (a, b)) in input.iter().zip(out).enumerate() {
        if a != b && !allowed.iter().any(|r| r.contains(&i)) {
            return Err(format!(
                "byte {i} changed ({a:02x} → {b:02x}), which a rewrite must keep"
            ));
        }
    }
    Ok(())
}

/// The MACs are the next hop's (a configured neighbour of the new
/// destination) and the interface towards it; XDP_TX only back out of the
/// interface the packet came in on, XDP_REDIRECT only out of another.
fn next_hop(
    world: &World,
    out: &[u8],
    dst: IpAddr,
    verdict: Verdict,
    ingress: Side,
    program: Program,
) -> Result<(), String> {
    let n = world
        .neighbour(dst)
        .ok_or_else(|| format!("forwarded to {dst}, which has no neighbour entry"))?;
    if out[0..6] != n.mac || out[6..12] != n.side.mac() {
        return Err(format!(
            "MACs {} / {} for {dst}: expected {} from {}",
            wire::hex(&out[0..6]),
            wire::hex(&out[6..12]),
            wire::hex(&n.mac),
            wire::hex(&n.side.mac())
        ));
    }
    if program == Program::Xdp {
        let same = n.side == ingress;
        match verdict {
            Verdict::Tx if !same => {
                return Err(format!(
                    "XDP_TX out of {} towards {dst}, which is behind {}",
                    ingress.device(),
                    n.side.device()
                ));
            }
            Verdict::Redirect if same => {
                return Err(format!(
                    "XDP_REDIRECT towards {dst}, behind the ingress {} (TX expected)",
                    ingress.device()
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The IPv4 header checksum and the transport checksum of a rewrite.
fn checksums(
    input: &[u8],
    out: &[u8],
    vin: &IpView,
    vout: &IpView,
    j: &mut Judgement,
) -> Result<(), String> {
    if let (Some(a), Some(b)) = (vin.v4_header(input), vout.v4_header(out)) {
        sum_field(input, out, a, b, 10, 0, 0, false, "IPv4 header", j)?;
    }
    let Some(check_at) = vin.l4_check_at() else {
        return Ok(());
    };
    if vin.later_fragment || check_at + 2 > input.len() {
        return Ok(()); // no transport header here
    }
    let (cin, cout) = (be16(input, check_at), be16(out, check_at));
    if vin.proto == UDP {
        if cin == Some(0) {
            // IPv4 "no checksum" stays none; an IPv6 zero (invalid) may be
            // left alone, or updated like any other value.
            if cout == Some(0) {
                return Ok(());
            }
            if !vin.v6 {
                return Err("UDP checksum 0 (none) was changed".into());
            }
        } else if cout == Some(0) {
            return Err("UDP checksum became 0, which means \"none\"".into());
        }
    }
    let end = vin.ip_end.min(input.len());
    if end < vin.l4 + 8 {
        return Ok(());
    }
    let len = vin.ip_end.saturating_sub(vin.l4) as u32;
    let pin = pseudo_sum(vin.src, vin.dst, vin.proto, len);
    let pout = pseudo_sum(vout.src, vout.dst, vout.proto, len);
    // From scratch only where the input holds the whole datagram.
    let whole = !vin.fragment && vin.ip_end <= input.len();
    sum_field(
        input,
        out,
        vin.l4..end,
        vout.l4..end,
        check_at - vin.l4,
        pin,
        pout,
        whole,
        if vin.proto == TCP { "TCP" } else { "UDP" },
        j,
    )
}

/// Checks the checksum at `field` (offset into the covered range) of the
/// data `rin`/`rout` (plus pseudo-header sums `pin`/`pout`): if the input's
/// verified (and `whole`: it covers everything the checksum does), the
/// output's must verify, computed from scratch; otherwise it must be off by
/// what the input's was (one's complement: stored_out ≡ stored_in +
/// sum_in − sum_out, the sums taken without the checksum field).
#[allow(clippy::too_many_arguments)]
fn sum_field(
    input: &[u8],
    out: &[u8],
    rin: Range<usize>,
    rout: Range<usize>,
    field: usize,
    pin: u64,
    pout: u64,
    whole: bool,
    what: &str,
    j: &mut Judgement,
) -> Result<(), String> {
    let (din, dout) = (&input[rin], &out[rout]);
    if field + 2 > din.len() || field + 2 > dout.len() {
        return Ok(());
    }
    let stored = |d: &[u8]| u64::from(u16::from_be_bytes([d[field], d[field + 1]]));
    let without = |d: &[u8]| sum(&d[..field]) + sum(&d[field + 2..]);
    let (sin, sout) = (pin + without(din), pout + without(dout));
    let in_ok = verifies(sin + stored(din));
    if whole && in_ok {
        if !verifies(sout + stored(dout)) {
            return Err(format!(
                "{what} checksum {:04x} is wrong: recomputed from scratch it is {:04x}",
                stored(dout),
                wire::checksum_of(sout)
            ));
        }
        j.verified += 1;
        return Ok(());
    }
    // `field` is even in every header here: summing around it keeps the
    // words aligned.
    let expected = wire::modulo(stored(din) + wire::modulo(sin) + 0xffff - wire::modulo(sout));
    if wire::modulo(stored(dout)) != expected {
        return Err(format!(
            "{what} checksum {:04x} → {:04x}: not consistent with the rewrite (expected {:04x} \
             or its one's-complement twin)",
            stored(din),
            stored(dout),
            expected
        ));
    }
    if in_ok {
        j.verified += 1;
    } else {
        j.kept_wrong += 1;
    }
    Ok(())
}

/// The oracle refuses what it must: each test builds the right output from
/// scratch, checks it passes, then spoils one thing.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        fib::{CLIENT_MAC, T0_MAC, T1_MAC, backend_mac},
        fuzz::build::{self, Tcp, V4},
    };
    use agent_common::reason;

    const ETH_IPV4: u16 = wire::ETHERTYPE_IPV4;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A TCP frame from `src` to `dst` with `ttl`, between `smac` and `dmac`.
    fn tcp_frame(
        src: SocketAddr,
        dst: SocketAddr,
        ttl: u8,
        dmac: [u8; 6],
        smac: [u8; 6],
    ) -> Vec<u8> {
        let h = Tcp {
            sport: src.port(),
            dport: dst.port(),
            seq: 7,
            ack: 9,
            flags: 0x02,
            window: 512,
            options: Vec::new(),
        };
        let seg = build::tcp(src.ip(), dst.ip(), &h, b"hello");
        let ip = build::ipv4(
            src.ip(),
            dst.ip(),
            TCP,
            &V4 {
                ttl,
                ..V4::default()
            },
            &seg,
        );
        build::ethernet(dmac, smac, ETH_IPV4, &ip)
    }

    fn counted(code: Option<u32>) -> Vec<u64> {
        let mut c = vec![0; reason::ALL.len()];
        if let Some(code) = code {
            c[code as usize] = 1;
        }
        c
    }

    fn judge(
        o: &Oracle,
        input: &[u8],
        v: Verdict,
        out: &[u8],
        code: Option<u32>,
    ) -> Result<Judgement, String> {
        o.judge(input, Side::Clients, Program::Xdp, v, out, &counted(code))
            .map_err(|r| r.why)
    }

    const CLIENT: &str = "10.0.1.2:40000";
    const VIP: &str = "10.100.0.1:80";

    fn to_vip() -> Vec<u8> {
        tcp_frame(sa(CLIENT), sa(VIP), 64, T1_MAC, CLIENT_MAC)
    }

    fn dnatted(backend: &str, ttl: u8) -> Vec<u8> {
        tcp_frame(sa(CLIENT), sa(backend), ttl, backend_mac(1), T0_MAC)
    }

    #[test]
    fn a_valid_dnat_is_accepted_and_its_flow_reported() {
        let o = Oracle::new();
        let j = judge(
            &o,
            &to_vip(),
            Verdict::Redirect,
            &dnatted("10.1.1.2:8080", 63),
            None,
        )
        .unwrap();
        assert_eq!(j.class, "forwarded to a backend (dnat)");
        assert_eq!(j.verified, 2, "IPv4 header and TCP checksums");
        assert_eq!(j.flow.unwrap().backend, sa("10.1.1.2:8080"));
    }

    #[test]
    fn dsr_keeps_every_address_and_goes_to_a_backends_mac() {
        let o = Oracle::new();
        const DSR_VIP: &str = "10.100.0.4:80";
        let input = tcp_frame(sa(CLIENT), sa(DSR_VIP), 64, T1_MAC, CLIENT_MAC);
        // Right: the frame as sent, TTL one less, to backend 1's MAC.
        let out = tcp_frame(sa(CLIENT), sa(DSR_VIP), 63, backend_mac(1), T0_MAC);
        let j = judge(&o, &input, Verdict::Redirect, &out, None).unwrap();
        assert_eq!(j.class, "forwarded to a backend (dsr)");
        assert_eq!(j.flow.unwrap().backend, sa("10.1.1.2:80"));
        // To a host that is no backend of the service (backend 2), or a
        // drained one (backend 3).
        let out = tcp_frame(sa(CLIENT), sa(DSR_VIP), 63, backend_mac(2), T0_MAC);
        assert!(
            judge(&o, &input, Verdict::Redirect, &out, None)
                .unwrap_err()
                .contains("not a valid rewrite")
        );
        let out = tcp_frame(sa(CLIENT), sa(DSR_VIP), 63, backend_mac(3), T0_MAC);
        assert!(
            judge(&o, &input, Verdict::Redirect, &out, None)
                .unwrap_err()
                .contains("drained")
        );
        // Translated as dnat would: DSR must not.
        let out = tcp_frame(sa(CLIENT), sa("10.1.1.2:80"), 63, backend_mac(1), T0_MAC);
        assert!(
            judge(&o, &input, Verdict::Redirect, &out, None)
                .unwrap_err()
                .contains("not a valid rewrite")
        );
    }

    #[test]
    fn a_rewrite_towards_a_non_backend_or_a_drained_one_is_refused() {
        let o = Oracle::new();
        let out = tcp_frame(sa(CLIENT), sa("10.1.1.2:9999"), 63, backend_mac(1), T0_MAC);
        assert!(
            judge(&o, &to_vip(), Verdict::Redirect, &out, None)
                .unwrap_err()
                .contains("not a valid rewrite")
        );
        let out = tcp_frame(sa(CLIENT), sa("10.1.3.2:8080"), 63, backend_mac(3), T0_MAC);
        assert!(
            judge(&o, &to_vip(), Verdict::Redirect, &out, None)
                .unwrap_err()
                .contains("drained")
        );
    }

    #[test]
    fn changed_payload_ttl_checksum_or_macs_are_refused() {
        let o = Oracle::new();
        let good = dnatted("10.1.1.2:8080", 63);
        let mut payload = good.clone();
        *payload.last_mut().unwrap() ^= 1;
        let mut check = good.clone();
        check[14 + 20 + 17] ^= 1;
        let mut mac = good.clone();
        mac[0] ^= 1;
        for (what, out) in [
            ("payload", payload),
            ("TTL", dnatted("10.1.1.2:8080", 64)),
            ("checksum", check),
            ("MAC", mac),
        ] {
            assert!(
                judge(&o, &to_vip(), Verdict::Redirect, &out, None).is_err(),
                "{what}"
            );
        }
        // XDP_TX out of the client side towards a backend is wrong too.
        assert!(judge(&o, &to_vip(), Verdict::Tx, &good, None).is_err());
    }

    #[test]
    fn drops_need_exactly_one_dropping_reason() {
        let o = Oracle::new();
        let p = to_vip();
        assert!(judge(&o, &p, Verdict::Drop, &p, Some(reason::TRUNCATED)).is_ok());
        assert!(
            judge(&o, &p, Verdict::Drop, &p, None)
                .unwrap_err()
                .contains("without a counted reason")
        );
        assert!(judge(&o, &p, Verdict::Drop, &p, Some(reason::SHORT_FRAME)).is_err());
        let mut two = counted(Some(reason::TRUNCATED));
        two[reason::BAD_LENGTH as usize] = 1;
        let refusal = o
            .judge(&p, Side::Clients, Program::Xdp, Verdict::Drop, &p, &two)
            .unwrap_err();
        assert_eq!(refusal.finding, Some(finding::SEVERAL_REASONS));
        // A drop counted under its reason and one that passes (a note).
        let mut noted = counted(Some(reason::TRUNCATED));
        noted[reason::MALFORMED as usize] = 1;
        let refusal = o
            .judge(&p, Side::Clients, Program::Xdp, Verdict::Drop, &p, &noted)
            .unwrap_err();
        assert_eq!(refusal.finding, Some(finding::SEVERAL_REASONS));
        assert!(judge(&o, &p, Verdict::Aborted, &p, None).is_err());
    }

    #[test]
    fn passes_must_be_untouched_unless_a_reason_explains_a_valid_rewrite() {
        let o = Oracle::new();
        let p = to_vip();
        assert_eq!(
            judge(&o, &p, Verdict::Pass, &p, None).unwrap().class,
            "passed untouched, to a service"
        );
        let other = tcp_frame(sa(CLIENT), sa("10.100.0.9:80"), 64, T1_MAC, CLIENT_MAC);
        assert_eq!(
            judge(&o, &other, Verdict::Pass, &other, None)
                .unwrap()
                .class,
            "passed untouched"
        );
        assert!(
            judge(&o, &p, Verdict::Pass, &p, Some(reason::NO_BACKEND)).is_err(),
            "a dropping reason"
        );
        // The rewrite without TTL and MACs, handed to the kernel: only with a reason.
        let mut handed = tcp_frame(sa(CLIENT), sa("10.1.1.2:8080"), 64, T1_MAC, CLIENT_MAC);
        assert!(judge(&o, &p, Verdict::Pass, &handed, None).is_err());
        assert!(
            judge(
                &o,
                &p,
                Verdict::Pass,
                &handed,
                Some(reason::FIB_NO_NEIGHBOUR)
            )
            .is_ok()
        );
        handed[20] ^= 1; // an IPv4 flag bit
        assert!(
            judge(
                &o,
                &p,
                Verdict::Pass,
                &handed,
                Some(reason::FIB_NO_NEIGHBOUR)
            )
            .is_err()
        );
    }

    #[test]
    fn replies_go_only_to_clients_that_sent_to_the_service() {
        let mut o = Oracle::new();
        let reply = tcp_frame(sa("10.1.1.2:8080"), sa(CLIENT), 64, T0_MAC, backend_mac(1));
        let out = tcp_frame(sa(VIP), sa(CLIENT), 63, CLIENT_MAC, T1_MAC);
        assert!(
            judge(&o, &reply, Verdict::Redirect, &out, None).is_err(),
            "no such client yet"
        );
        o.record(&to_vip());
        let j = judge(&o, &reply, Verdict::Redirect, &out, None);
        // It arrived on the client side in this helper: TX would be right,
        // REDIRECT is refused; from the backend side REDIRECT is right.
        assert!(j.is_err());
        let j = o
            .judge(
                &reply,
                Side::Backends,
                Program::Xdp,
                Verdict::Redirect,
                &out,
                &counted(None),
            )
            .unwrap();
        assert_eq!(j.class, "forwarded reply to a client (dnat)");
        // The source must be the VIP the client used, not another.
        let other = tcp_frame(sa("10.100.0.2:80"), sa(CLIENT), 63, CLIENT_MAC, T1_MAC);
        assert!(
            o.judge(
                &reply,
                Side::Backends,
                Program::Xdp,
                Verdict::Redirect,
                &other,
                &counted(None)
            )
            .is_err()
        );
    }

    #[test]
    fn an_icmp_translation_must_quote_a_flow_of_a_client_that_sent() {
        let mut o = Oracle::new();
        let quoted = |src: SocketAddr, dst: SocketAddr| {
            let f = tcp_frame(src, dst, 63, [0; 6], [0; 6]);
            f[14..14 + 28].to_vec() // IP header and 8 bytes
        };
        let icmp = |body: Vec<u8>, to: IpAddr| {
            let router: IpAddr = "10.1.200.1".parse().unwrap();
            let m = build::icmp(router, to, 3, 4, [0, 0, 5, 0xdc], &body);
            let ip = build::ipv4(router, to, 1, &V4::default(), &m);
            build::ethernet(T0_MAC, backend_mac(1), ETH_IPV4, &ip)
        };
        let input = icmp(quoted(sa(CLIENT), sa("10.1.1.2:8080")), sa(CLIENT).ip());
        let out = icmp(quoted(sa(CLIENT), sa(VIP)), sa(CLIENT).ip());
        assert!(
            judge(&o, &input, Verdict::Pass, &out, None).is_err(),
            "the client never sent"
        );
        o.record(&to_vip());
        let j = judge(&o, &input, Verdict::Pass, &out, None).unwrap();
        assert_eq!(j.class, "passed, ICMP error translated (dnat)");
        let mut spoiled = out.clone();
        spoiled[14 + 20 + 2] ^= 1; // the ICMP checksum
        assert!(judge(&o, &input, Verdict::Pass, &spoiled, None).is_err());
    }
}
