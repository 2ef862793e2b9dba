//! The packets: generated from the configured world (to its VIPs, from its
//! backends, ICMP errors about its flows, other protocols, noise), varied
//! (IPv4 options, IPv6 extension headers, fragments, TTLs, bad lengths and
//! checksums, truncation at every offset), then mutated (bit flips, byte
//! changes). Everything comes from one seeded generator, and from the flows
//! the datapath was seen to open (as a real peer answers what it got).

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
};

use super::{
    build::{self, Tcp, V4},
    wire::{AH, DEST_OPTS, FRAGMENT, HOP_BY_HOP, PROTO_ICMP, PROTO_ICMPV6, ROUTING},
    world::{Side, TCP, UDP, World},
};

/// SplitMix64: small, fast, and the same sequence on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }
    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u32) -> bool {
        self.below(100) < percent as usize
    }
    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
    pub fn u8(&mut self) -> u8 {
        self.u64() as u8
    }
    pub fn u16(&mut self) -> u16 {
        self.u64() as u16
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

/// Which program a packet goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Program {
    Xdp,
    Tc,
}

/// One generated packet and how it arrives.
#[derive(Clone, Debug)]
pub struct Input {
    pub bytes: Vec<u8>,
    pub ingress: Side,
    pub program: Program,
    /// What the generator meant it to be (for the report).
    pub kind: &'static str,
}

/// A flow the datapath was seen to forward to a backend: `from` is the
/// source the backend sees (the client, or the SNAT address and port).
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub proto: u8,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub from: SocketAddr,
    pub backend: SocketAddr,
}

/// How the packets are made.
pub struct Generator {
    seed: u64,
    /// Packets generated so far (queued ones not counted).
    made: u64,
    rng: Rng,
    world: World,
    /// Flows recently seen forwarded (replies and ICMP errors quote them).
    flows: VecDeque<Flow>,
    /// Packets waiting to be sent: a sweep of every truncation, the other
    /// fragments of a datagram.
    queue: VecDeque<Input>,
    /// Share of packets sent through the TC program, in percent.
    tc_percent: u32,
}

const RECENT_FLOWS: usize = 512;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_URG: u8 = 0x20;

impl Generator {
    pub fn new(seed: u64, tc_percent: u32) -> Self {
        Self {
            seed,
            made: 0,
            rng: Rng::new(seed),
            world: World::standard(),
            flows: VecDeque::new(),
            queue: VecDeque::new(),
            tc_percent,
        }
    }

    /// Told of a flow the datapath forwarded, so later packets can answer it.
    pub fn saw(&mut self, flow: Flow) {
        if self.flows.len() == RECENT_FLOWS {
            self.flows.pop_front();
        }
        self.flows.push_back(flow);
    }

    pub fn packet(&mut self) -> Input {
        if let Some(queued) = self.queue.pop_front() {
            return queued;
        }
        // Each packet draws from its own generator, seeded by the run's seed
        // and its number: where the datapath's answers differ between runs
        // (a backend chosen after a time-based ejection, say), only packets
        // that answer those flows differ, not everything after them.
        self.rng = Rng::new(self.seed ^ self.made.wrapping_mul(0xd6e8_feb8_6659_fd93));
        self.rng.u64();
        self.made += 1;
        let program = if self.rng.percent(self.tc_percent) {
            Program::Tc
        } else {
            Program::Xdp
        };
        let roll = self.rng.below(100);
        let mut input = match roll {
            0..35 => self.for_a_service(program),
            35..55 => self.reply(program),
            55..65 => self.icmp_error(program),
            65..73 => self.other_protocol(program),
            73..80 => self.fragments(program),
            80..84 => self.noise(program),
            _ => self.for_a_service(program),
        };
        // Truncation at every offset, now and then for a whole packet (one
        // in 500: about a fifth of all packets are such prefixes).
        if self.rng.below(500) == 0 {
            for len in 14..input.bytes.len() {
                self.queue.push_back(Input {
                    bytes: input.bytes[..len].to_vec(),
                    kind: "truncation sweep",
                    ..input.clone()
                });
            }
        } else if self.rng.percent(8) && input.bytes.len() > 14 {
            let len = 14 + self.rng.below(input.bytes.len() - 14);
            input.bytes.truncate(len);
        }
        if self.rng.percent(25) {
            self.mutate(&mut input.bytes);
        }
        input
    }

    fn client(&mut self, v6: bool) -> IpAddr {
        let pool = if v6 {
            &self.world.clients_v6
        } else {
            &self.world.clients_v4
        };
        // Mostly the clients with neighbour entries (their replies forward).
        if self.rng.percent(80) {
            pool[self.rng.below(5)]
        } else {
            *self.rng.pick(pool)
        }
    }

    /// A client port: a small set, so flows recur (retransmissions, FINs
    /// and RSTs on known flows, reused tuples), or any.
    fn client_port(&mut self) -> u16 {
        if self.rng.percent(75) {
            40_000 + self.rng.below(48) as u16
        } else {
            self.rng.u16()
        }
    }

    fn tcp_flags(&mut self) -> u8 {
        match self.rng.below(100) {
            0..35 => TCP_SYN,
            35..55 => TCP_ACK,
            55..60 => TCP_ACK | TCP_PSH,
            60..66 => TCP_SYN | TCP_ACK,
            66..74 => TCP_FIN | TCP_ACK,
            74..82 => TCP_RST,
            82..86 => TCP_RST | TCP_ACK,
            // Conflicting flags.
            86..89 => TCP_SYN | TCP_FIN,
            89..92 => TCP_SYN | TCP_RST,
            92..94 => TCP_SYN | TCP_FIN | TCP_RST | TCP_PSH | TCP_URG | TCP_ACK,
            94..96 => 0,
            _ => self.rng.u8(),
        }
    }

    fn ttl(&mut self) -> u8 {
        if self.rng.percent(10) {
            *self.rng.pick(&[0, 1, 2, 255])
        } else {
            64
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        let n = match self.rng.below(10) {
            0..4 => 0,
            4..9 => self.rng.below(64),
            _ => self.rng.below(600),
        };
        self.rng.bytes(n)
    }

    /// TCP options: nothing, well-formed ones, or garbage.
    fn tcp_options(&mut self) -> Vec<u8> {
        match self.rng.below(10) {
            0..7 => Vec::new(),
            7..9 => vec![2, 4, 0x05, 0xb4, 1, 3, 3, 7, 4, 2, 1, 1],
            _ => {
                let n = self.rng.below(41);
                self.rng.bytes(n)
            }
        }
    }

    /// A transport segment (TCP or UDP) from `src` to `dst`.
    fn segment(&mut self, proto: u8, src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
        let payload = self.payload();
        let mut l4 = if proto == TCP {
            let h = Tcp {
                sport: src.port(),
                dport: dst.port(),
                seq: self.rng.u64() as u32,
                ack: self.rng.u64() as u32,
                flags,
                window: 0xffff,
                options: self.tcp_options(),
            };
            build::tcp(src.ip(), dst.ip(), &h, &payload)
        } else {
            build::udp(src.ip(), dst.ip(), src.port(), dst.port(), &payload)
        };
        // Bad checksums, zero UDP checksums, lying lengths.
        if self.rng.percent(8) {
            let at = if proto == TCP { 16 } else { 6 };
            l4[at] ^= 1 << self.rng.below(8);
        }
        if proto == UDP {
            if self.rng.percent(3) {
                l4[6..8].copy_from_slice(&[0, 0]);
            }
            if self.rng.percent(4) {
                let len = self.rng.u16();
                l4[4..6].copy_from_slice(&len.to_be_bytes());
            }
        } else if self.rng.percent(4) {
            l4[12] = (self.rng.u8() & 0xf0) | (l4[12] & 0x0f);
        }
        l4
    }

    /// An IP packet around `l4`, varied: IPv4 options, IPv6 extension
    /// headers, TTL, bad lengths and header checksums, padding.
    fn ip(&mut self, src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let ttl = self.ttl();
        let mut ip = if src.is_ipv6() {
            let (first, ext) = if self.rng.percent(15) {
                self.extension_headers(proto)
            } else {
                (proto, Vec::new())
            };
            let mut ip = build::ipv6(src, dst, first, ttl, &ext, l4);
            if self.rng.percent(4) {
                let len = self.rng.u16();
                ip[4..6].copy_from_slice(&len.to_be_bytes());
            }
            ip
        } else {
            let h = V4 {
                tos: if self.rng.percent(5) {
                    self.rng.u8()
                } else {
                    0
                },
                id: self.rng.u16(),
                frag: if self.rng.percent(50) { 0x4000 } else { 0 },
                ttl,
                options: if self.rng.percent(10) {
                    self.ipv4_options()
                } else {
                    Vec::new()
                },
            };
            let mut ip = build::ipv4(src, dst, proto, &h, l4);
            if self.rng.percent(4) {
                let len = match self.rng.below(3) {
                    0 => self.rng.u16(),
                    1 => (ip.len() as u16).wrapping_add(1 + self.rng.below(8) as u16),
                    _ => (ip.len() as u16).wrapping_sub(1 + self.rng.below(8) as u16),
                };
                ip[2..4].copy_from_slice(&len.to_be_bytes());
            }
            if self.rng.percent(3) {
                ip[0] = (ip[0] & 0xf0) | (self.rng.u8() & 0x0f);
            }
            if self.rng.percent(5) {
                ip[10] ^= 1 << self.rng.below(8);
            }
            ip
        };
        // Ethernet padding past the IP packet's end.
        if self.rng.percent(10) {
            let n = 1 + self.rng.below(20);
            ip.extend(self.rng.bytes(n));
        }
        ip
    }

    fn ipv4_options(&mut self) -> Vec<u8> {
        match self.rng.below(5) {
            0 => vec![1, 1, 1, 0],
            // Record route with room for two addresses.
            1 => vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            // Timestamp.
            2 => vec![68, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            // Router alert.
            3 => vec![148, 4, 0, 0],
            _ => {
                let n = 1 + self.rng.below(40);
                self.rng.bytes(n)
            }
        }
    }

    /// A chain of IPv6 extension headers ending in `upper`: returns the
    /// fixed header's Next Header and the chain's bytes.
    fn extension_headers(&mut self, upper: u8) -> (u8, Vec<u8>) {
        let count = 1 + self.rng.below(6);
        let kinds: Vec<u8> = (0..count)
            .map(|_| {
                *self
                    .rng
                    .pick(&[HOP_BY_HOP, ROUTING, DEST_OPTS, FRAGMENT, FRAGMENT, AH])
            })
            .collect();
        let mut bytes = Vec::new();
        for (i, &kind) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(upper);
            match kind {
                FRAGMENT => {
                    // Mostly atomic (offset 0, no more): the whole datagram.
                    let field: u16 = match self.rng.below(4) {
                        0..2 => 0,
                        2 => 1,
                        _ => self.rng.u16() & 0xfff9,
                    };
                    bytes.extend_from_slice(&[next, 0]);
                    bytes.extend_from_slice(&field.to_be_bytes());
                    bytes.extend_from_slice(&self.rng.u64().to_be_bytes()[..4]);
                }
                AH => {
                    // Payload length in 4-byte words minus 2: 12 + 4 bytes.
                    bytes.extend_from_slice(&[next, 2, 0, 0]);
                    bytes.extend(self.rng.bytes(12));
                }
                _ => {
                    let units = self.rng.below(3);
                    bytes.extend_from_slice(&[next, units as u8]);
                    // PadN filling the rest: 6 + 8 × units bytes.
                    let pad = 6 + 8 * units;
                    bytes.extend_from_slice(&[1, (pad - 2) as u8]);
                    bytes.extend(std::iter::repeat_n(0, pad - 2));
                }
            }
        }
        (kinds[0], bytes)
    }

    fn frame(&mut self, ingress: Side, sender_mac: [u8; 6], ip: &[u8], v6: bool) -> Vec<u8> {
        build::ethernet(ingress.mac(), sender_mac, build::ether_type(v6), ip)
    }

    fn sender_mac(&self, src: IpAddr) -> [u8; 6] {
        self.world
            .neighbour(src)
            .map(|n| n.mac)
            .unwrap_or([0x02, 0xee, 0, 0, 0, 1])
    }

    /// From a client to a service, or close by (another port, protocol or
    /// VIP of the same family).
    fn for_a_service(&mut self, program: Program) -> Input {
        let svc = self.rng.pick(&self.world.services).clone();
        let v6 = svc.vip.is_ipv6();
        let (mut vip, mut port, mut proto) = (svc.vip, svc.port, svc.proto);
        let kind = if self.rng.percent(15) {
            match self.rng.below(3) {
                0 => port = self.rng.u16(),
                1 => proto = if proto == TCP { UDP } else { TCP },
                _ => {
                    vip = if v6 {
                        "fd64::9".parse().unwrap()
                    } else {
                        "10.100.0.9".parse().unwrap()
                    }
                }
            }
            "near a service"
        } else {
            "to a service"
        };
        let client = SocketAddr::new(self.client(v6), self.client_port());
        let flags = self.tcp_flags();
        let l4 = self.segment(proto, client, SocketAddr::new(vip, port), flags);
        let ip = self.ip(client.ip(), vip, proto, &l4);
        let ingress = if self.rng.percent(90) {
            Side::Clients
        } else {
            Side::Backends
        };
        let mac = self.sender_mac(client.ip());
        Input {
            bytes: self.frame(ingress, mac, &ip, v6),
            ingress,
            program,
            kind,
        }
    }

    /// From a backend: the reply of a flow seen forwarded, or of none.
    fn reply(&mut self, program: Program) -> Input {
        let (proto, from, to, kind) = match self.flows.len() {
            n if n > 0 && self.rng.percent(85) => {
                let f = self.flows[self.rng.below(n)];
                (f.proto, f.backend, f.from, "reply of a flow")
            }
            _ => {
                let svc = self.rng.pick(&self.world.services).clone();
                let (backend, _) = *self.rng.pick(&svc.backends);
                let v6 = backend.is_ipv6();
                let to = match svc.snat {
                    Some(snat) if self.rng.percent(60) => SocketAddr::new(snat, self.rng.u16()),
                    _ => SocketAddr::new(self.client(v6), self.client_port()),
                };
                (svc.proto, backend, to, "from a backend, no flow")
            }
        };
        let flags = match self.rng.below(10) {
            0..3 => TCP_SYN | TCP_ACK,
            3..6 => TCP_ACK,
            6 => TCP_RST,
            7 => TCP_FIN | TCP_ACK,
            _ => self.tcp_flags(),
        };
        let l4 = self.segment(proto, from, to, flags);
        let ip = self.ip(from.ip(), to.ip(), proto, &l4);
        let ingress = if self.rng.percent(90) {
            Side::Backends
        } else {
            Side::Clients
        };
        let mac = self.sender_mac(from.ip());
        Input {
            bytes: self.frame(ingress, mac, &ip, from.is_ipv6()),
            ingress,
            program,
            kind,
        }
    }

    /// An ICMP error quoting a packet of a flow seen forwarded (as the
    /// backend got it), sent by the backend, a router, or a client (forged),
    /// with any type and code; or quoting a packet no flow has.
    fn icmp_error(&mut self, program: Program) -> Input {
        let flow = match self.flows.len() {
            n if n > 0 && self.rng.percent(85) => self.flows[self.rng.below(n)],
            _ => {
                let svc = self.rng.pick(&self.world.services).clone();
                let (backend, _) = *self.rng.pick(&svc.backends);
                let client = SocketAddr::new(self.client(backend.is_ipv6()), self.client_port());
                Flow {
                    proto: svc.proto,
                    client,
                    vip: SocketAddr::new(svc.vip, svc.port),
                    from: SocketAddr::new(svc.snat.unwrap_or(client.ip()), client.port()),
                    backend,
                }
            }
        };
        let v6 = flow.backend.is_ipv6();
        // The quoted packet: as the backend got it, or (now and then) as the
        // client sent it.
        let (qsrc, qdst) = if self.rng.percent(85) {
            (flow.from, flow.backend)
        } else {
            (flow.client, flow.vip)
        };
        let flags = self.tcp_flags();
        let quoted_l4 = self.segment(flow.proto, qsrc, qdst, flags);
        let quoted = if v6 {
            build::ipv6(qsrc.ip(), qdst.ip(), flow.proto, 63, &[], &quoted_l4)
        } else {
            let h = V4 {
                ttl: 63,
                options: if self.rng.percent(5) {
                    self.ipv4_options()
                } else {
                    Vec::new()
                },
                ..V4::default()
            };
            build::ipv4(qsrc.ip(), qdst.ip(), flow.proto, &h, &quoted_l4)
        };
        // How much of it the error quotes: the IP header and 8 bytes (RFC
        // 792), more, everything, or less.
        let header = if v6 {
            40
        } else {
            usize::from(quoted[0] & 0x0f) * 4
        };
        let keep = match self.rng.below(10) {
            0..4 => header + 8,
            4..7 => quoted.len(),
            7..9 => (header + 8 + self.rng.below(32)).min(quoted.len()),
            _ => self.rng.below(header + 8),
        };
        let body = &quoted[..keep.min(quoted.len())];
        let (icmp_type, code) = if v6 {
            match self.rng.below(10) {
                0..4 => (1, self.rng.below(8) as u8),
                4..7 => (2, 0),
                7 => (3, 0),
                8 => (4, self.rng.below(3) as u8),
                _ => (self.rng.u8(), self.rng.u8()),
            }
        } else {
            match self.rng.below(10) {
                0..5 => (3, self.rng.below(16) as u8),
                5..7 => (3, 4),
                7 => (11, 0),
                8 => (12, 0),
                _ => (self.rng.u8(), self.rng.u8()),
            }
        };
        let mtu: u32 = *self.rng.pick(&[1280, 1400, 68, 0, 65535]);
        let rest = if v6 || icmp_type == 3 {
            mtu.to_be_bytes()
        } else {
            [0; 4]
        };
        let (sender, ingress, kind) = match self.rng.below(10) {
            0..6 => (
                flow.backend.ip(),
                Side::Backends,
                "ICMP error from the backend",
            ),
            6..8 => {
                let router = self.world.routers[usize::from(v6)];
                (router, Side::Backends, "ICMP error from a router")
            }
            _ => (flow.client.ip(), Side::Clients, "ICMP error from a client"),
        };
        let to = qsrc.ip();
        let proto = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
        let mut message = build::icmp(sender, to, icmp_type, code, rest, body);
        if self.rng.percent(5) {
            message[2] ^= 1 << self.rng.below(8);
        }
        let ip = self.ip(sender, to, proto, &message);
        let mac = self.sender_mac(sender);
        Input {
            bytes: self.frame(ingress, mac, &ip, v6),
            ingress,
            program,
            kind,
        }
    }

    /// ICMP echo, and protocols Sluice doesn't balance, to VIPs and from
    /// backends.
    fn other_protocol(&mut self, program: Program) -> Input {
        let svc = self.rng.pick(&self.world.services).clone();
        let v6 = svc.vip.is_ipv6();
        let (src, dst, ingress) = if self.rng.percent(60) {
            (self.client(v6), svc.vip, Side::Clients)
        } else {
            let (b, _) = *self.rng.pick(&svc.backends);
            (b.ip(), self.client(v6), Side::Backends)
        };
        let (proto, l4, kind) = match self.rng.below(4) {
            0 => {
                let (t, p) = if v6 {
                    (128, PROTO_ICMPV6)
                } else {
                    (8, PROTO_ICMP)
                };
                let body = self.payload();
                (
                    p,
                    build::icmp(src, dst, t, 0, [0, 1, 0, 1], &body),
                    "ICMP echo",
                )
            }
            _ => {
                // GRE, ESP, SCTP, IP-in-IP, no next header, 0 and 255.
                let proto = *self.rng.pick(&[47, 50, 132, 4, 41, 59, 0, 255, 2, 103]);
                let n = self.rng.below(80);
                (proto, self.rng.bytes(n), "another protocol")
            }
        };
        let ip = self.ip(src, dst, proto, &l4);
        let mac = self.sender_mac(src);
        Input {
            bytes: self.frame(ingress, mac, &ip, v6),
            ingress,
            program,
            kind,
        }
    }

    /// A datagram to a service cut into fragments (IPv4 flags and offset, or
    /// IPv6 fragment headers): the first is returned, the others queued; in
    /// order, out of order, or later ones only.
    fn fragments(&mut self, program: Program) -> Input {
        let svc = self.rng.pick(&self.world.services).clone();
        let v6 = svc.vip.is_ipv6();
        let client = SocketAddr::new(self.client(v6), self.client_port());
        let n = 24 + self.rng.below(200);
        let payload = self.rng.bytes(n);
        let vip = SocketAddr::new(svc.vip, svc.port);
        let l4 = if svc.proto == TCP {
            let h = Tcp {
                sport: client.port(),
                dport: vip.port(),
                seq: 1,
                ack: 0,
                flags: self.tcp_flags(),
                window: 1000,
                options: Vec::new(),
            };
            build::tcp(client.ip(), vip.ip(), &h, &payload)
        } else {
            build::udp(client.ip(), vip.ip(), client.port(), vip.port(), &payload)
        };
        // Fragment boundaries on 8-byte units.
        let cut = 8 * (1 + self.rng.below(l4.len() / 8 - 1));
        let pieces = [(0usize, &l4[..cut], true), (cut, &l4[cut..], false)];
        let id = 0x7000 + self.rng.below(16) as u32;
        let ttl = self.ttl();
        let mac = self.sender_mac(client.ip());
        let mut frames: Vec<Input> = pieces
            .iter()
            .map(|&(offset, piece, more)| {
                let ip = if v6 {
                    let field = ((offset / 8) as u16) << 3 | u16::from(more);
                    let mut ext = vec![svc.proto, 0];
                    ext.extend_from_slice(&field.to_be_bytes());
                    ext.extend_from_slice(&id.to_be_bytes());
                    build::ipv6(client.ip(), vip.ip(), FRAGMENT, ttl, &ext, piece)
                } else {
                    let frag = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
                    let h = V4 {
                        id: id as u16,
                        frag,
                        ttl,
                        ..V4::default()
                    };
                    build::ipv4(client.ip(), vip.ip(), svc.proto, &h, piece)
                };
                Input {
                    bytes: build::ethernet(Side::Clients.mac(), mac, build::ether_type(v6), &ip),
                    ingress: Side::Clients,
                    program,
                    kind: if offset == 0 {
                        "first fragment"
                    } else {
                        "later fragment"
                    },
                }
            })
            .collect();
        match self.rng.below(4) {
            0 => frames.reverse(),
            1 => {
                frames.remove(0);
            }
            _ => {}
        }
        let first = frames.remove(0);
        self.queue.extend(frames);
        first
    }

    /// Frames that aren't plain IP: ARP, VLAN-tagged IP to a VIP, other
    /// Ethernet types, wrong IP versions, random bytes.
    fn noise(&mut self, program: Program) -> Input {
        let dmac = Side::Clients.mac();
        let smac = [0x02, 0xee, 0, 0, 0, 2];
        let bytes = match self.rng.below(5) {
            0 => {
                let body = self.rng.bytes(28);
                build::ethernet(dmac, smac, 0x0806, &body)
            }
            1 | 2 => {
                let inner = self.for_a_service(program).bytes;
                let tpid = if self.rng.percent(50) { 0x8100 } else { 0x88a8 };
                let mut f = inner[..12].to_vec();
                f.extend_from_slice(&u16::to_be_bytes(tpid));
                f.extend_from_slice(&self.rng.u16().to_be_bytes());
                f.extend_from_slice(&inner[12..]);
                f
            }
            3 => {
                let mut f = self.for_a_service(program).bytes;
                if f.len() > 14 {
                    f[14] = (self.rng.u8() & 0xf0) | (f[14] & 0x0f);
                }
                f
            }
            _ => {
                let n = 14 + self.rng.below(120);
                self.rng.bytes(n)
            }
        };
        Input {
            bytes,
            ingress: Side::Clients,
            program,
            kind: "noise",
        }
    }

    /// One to four random changes, mostly in the headers.
    fn mutate(&mut self, b: &mut Vec<u8>) {
        for _ in 0..1 + self.rng.below(4) {
            if b.len() <= 14 {
                return;
            }
            let span = if self.rng.percent(75) {
                b.len().min(90)
            } else {
                b.len()
            };
            // The Ethernet addresses matter to no one: change what follows.
            let at = 12 + self.rng.below(span - 12);
            match self.rng.below(4) {
                0 | 1 => b[at] ^= 1 << self.rng.below(8),
                2 => b[at] = self.rng.u8(),
                _ => {
                    let n = self.rng.below(3);
                    b.truncate(b.len() - n.min(b.len() - 14));
                }
            }
        }
    }
}
