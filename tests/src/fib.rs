//! A namespace with fixed routes and permanent neighbours, so the datapath's
//! FIB lookups give known results when run by BPF_PROG_TEST_RUN from inside it.

use std::net::IpAddr;

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use sluice::{
    config,
    datapath::{Datapath, Sizes},
    reconcile::Reconciler,
};
use testbed::{Family, Netns, unique};

/// MAC of the LB's backend-side interface `t0`.
pub const T0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// MAC of the LB's client-side interface `t1`.
pub const T1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// MAC of the client.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];

/// MAC of backend i.
pub fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, 0xb0 + i as u8]
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Which backend (0..3) a forwarded frame went to, by its destination MAC.
pub fn backend_of(frame: &[u8]) -> usize {
    (0..3)
        .find(|&i| frame[..6] == backend_mac(i))
        .expect("sent to a backend")
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub struct FibBed {
    pub ns: Netns,
    pub datapath: Datapath,
    pub reconciler: Reconciler,
}

impl FibBed {
    /// A namespace where backends 0..3 sit behind `t0` and the client behind
    /// `t1`, and a datapath loaded with the services of `services_yaml`.
    pub fn new(services_yaml: &str) -> Result<Self> {
        Self::with_conntrack(services_yaml, 65_536)
    }

    /// As `new`, with a conntrack map of `conntrack` entries.
    pub fn with_conntrack(services_yaml: &str, conntrack: u32) -> Result<Self> {
        Self::with_object(services_yaml, conntrack, sluice::datapath::EBPF_OBJECT)
    }

    /// As `with_conntrack`, loading another build of the eBPF object.
    pub fn with_object(services_yaml: &str, conntrack: u32, object: &[u8]) -> Result<Self> {
        Self::with_tables(services_yaml, conntrack, 16_384, object)
    }

    /// As `with_object`, with a half-open table of `half_open` entries.
    pub fn with_tables(
        services_yaml: &str,
        conntrack: u32,
        half_open: u32,
        object: &[u8],
    ) -> Result<Self> {
        let ns = Netns::new(&unique("dp"))?;
        ns.exec(&[
            "ip", "link", "add", "t0", "type", "veth", "peer", "name", "t1",
        ])?;
        ns.exec(&[
            "ip",
            "link",
            "set",
            "t0",
            "address",
            &mac_text(T0_MAC),
            "up",
        ])?;
        ns.exec(&[
            "ip",
            "link",
            "set",
            "t1",
            "address",
            &mac_text(T1_MAC),
            "up",
        ])?;
        for (dev, addr) in [
            ("t0", "10.1.0.1/16"),
            ("t0", "fd01::1/16"),
            ("t1", "10.0.1.1/24"),
            ("t1", "fd00:1::1/64"),
        ] {
            let mut args = vec!["ip", "addr", "add", addr, "dev", dev];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.exec(&args)?;
        }
        let mut neighbours: Vec<(IpAddr, [u8; 6], &str)> = Vec::new();
        for fam in [Family::V4, Family::V6] {
            for i in 0..3 {
                neighbours.push((fam.backend(i), backend_mac(i), "t0"));
            }
            neighbours.push((fam.client(), CLIENT_MAC, "t1"));
        }
        for (ip, mac, dev) in neighbours {
            ns.exec(&[
                "ip",
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &mac_text(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            ns.exec(&["sysctl", "-qw", sysctl])?;
        }

        let text = format!("interfaces:\n  - name: t0\n{services_yaml}");
        let cfg = config::parse(&text, "test.yaml")?;
        let sizes = Sizes {
            conntrack,
            half_open,
            services: 8,
            backends: 64,
            table_size: 251,
            affinity: 1024,
        };
        let (datapath, maps) = Datapath::load_object(sizes, object, None)?;
        let mut reconciler =
            Reconciler::new(maps, sizes.table_size, sizes.services, sizes.backends)?;
        reconciler.set_new_flows_per_second(cfg.raw.limits.new_flows_per_second);
        reconciler.apply(&cfg.services)?;
        Ok(Self {
            ns,
            datapath,
            reconciler,
        })
    }

    /// Replaces the services with those of `services_yaml`.
    pub fn reconfigure(&mut self, services_yaml: &str) -> Result<()> {
        let text = format!("interfaces:\n  - name: t0\n{services_yaml}");
        let cfg = config::parse(&text, "test.yaml")?;
        self.reconciler.apply(&cfg.services)
    }

    /// Runs the XDP program once on `frame`: (return code, frame after).
    /// The frame arrives on the namespace's loopback device: neither the
    /// clients' side nor the backends'.
    pub fn run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.run_with(frame, None)
    }

    /// As `run`, with the frame arriving on `dev` (`t0`: from the backends'
    /// side, `t1`: from the clients').
    pub fn run_in(&mut self, dev: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let ifindex = self.ns.enter(|| sluice::netdev::ifindex(dev))?;
        anyhow::ensure!(ifindex != 0, "no device {dev} in the test namespace");
        self.run_with(frame, Some(ifindex))
    }

    fn run_with(&mut self, frame: &[u8], ifindex: Option<u32>) -> Result<(u32, Vec<u8>)> {
        let xdp = self.datapath.xdp_program()?;
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex.unwrap_or(0), 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let result = self.ns.enter(|| {
            xdp.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ifindex.map(|_| ctx.as_slice()),
                ..TestRunOptions::default()
            })
        })?;
        let result = result.context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// The id the agent gave the backend at `addr` of `service`.
    pub fn backend_id(&self, service: &str, addr: std::net::SocketAddr) -> u32 {
        self.reconciler.services[service]
            .backends
            .iter()
            .find(|b| b.addr == addr)
            .unwrap_or_else(|| panic!("{addr} is no backend of {service}"))
            .id
    }

    pub fn reason(&self, code: u32) -> u64 {
        self.reconciler.reason_count(code)
    }
}
