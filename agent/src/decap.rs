//! `sluice backend-decap`: the backend host's side of tunnelled direct
//! server return. Loads the datapath's object, attaches only its
//! `sluice_decap` program at TC (tcx) ingress of one interface, tells it
//! the VIPs whose IPIP / IP6IP6 packets to unwrap, and runs until SIGINT or
//! SIGTERM, then detaches and says what it did. Needs no ipip module: the
//! program strips the outer header itself.
//!
//! The backend must have each VIP on a local interface (its loopback):
//! the unwrapped packet is addressed to the VIP, and the backend answers
//! from it, to the client directly.

use std::{collections::BTreeSet, net::IpAddr};

use agent_common::{
    DecapVip, FAMILY_V4, FAMILY_V6, addr, decap_count,
    registry::{MAPS, Sizing, map, program},
};
use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};

use crate::{
    datapath::{EBPF_OBJECT, verify},
    discovery::kubernetes::trust::host_addresses,
    netdev,
};

/// What `sluice_decap` counted while it ran.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub decapsulated: u64,
    pub malformed: u64,
    pub not_ours: u64,
}

/// Refuses VIPs that are on no local interface, naming the first.
pub fn check_local(vips: &[IpAddr]) -> Result<()> {
    let local: BTreeSet<IpAddr> = host_addresses().into_iter().map(|(_, ip)| ip).collect();
    for vip in vips {
        if !local.contains(vip) {
            bail!(
                "VIP {vip} is not on a local interface: the backend accepts the unwrapped \
                 packet only for an address of its own; add it to the loopback first \
                 (ip addr add {vip}/{} dev lo)",
                if vip.is_ipv4() { 32 } else { 128 }
            );
        }
    }
    Ok(())
}

/// Attaches the decapsulation to `interface` for `vips`, runs until SIGINT
/// or SIGTERM, detaches, and returns what it counted.
pub fn run(interface: &str, vips: &[IpAddr]) -> Result<Counts> {
    if vips.is_empty() {
        bail!("give at least one --vip");
    }
    check_local(vips)?;
    if netdev::ifindex(interface) == 0 {
        bail!("interface {interface} does not exist");
    }
    let mut loader = EbpfLoader::new();
    // Only the decap program runs: the load balancer's tables stay at one
    // entry each instead of the memory their real sizes would take.
    for m in MAPS.iter().filter(|m| m.sizing != Sizing::Fixed) {
        loader.map_max_entries(m.name, 1);
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (maps)")?;
    let mut table: HashMap<MapData, DecapVip, u32> =
        HashMap::try_from(ebpf.take_map(map::DECAP_VIPS).with_context(|| {
            format!("map {} is missing from the eBPF object", map::DECAP_VIPS)
        })?)?;
    let mtu = mtu_of(interface)?;
    for vip in vips {
        let key = DecapVip {
            addr: addr::words(*vip),
            family: u32::from(if vip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }),
        };
        table
            .insert(key, max_mss(mtu, vip.is_ipv4()), 0)
            .with_context(|| format!("writing VIP {vip} into {}", map::DECAP_VIPS))?;
    }
    let counts: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(ebpf.take_map(map::DECAP_COUNTS).with_context(|| {
            format!("map {} is missing from the eBPF object", map::DECAP_COUNTS)
        })?)?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program::DECAP)
        .with_context(|| format!("program {} is missing from the eBPF object", program::DECAP))?
        .try_into()?;
    verify(|| prog.load())
        .with_context(|| format!("loading program {} (kernel verifier)", program::DECAP))?;
    let link = prog
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching {} to {interface} (tc ingress)", program::DECAP))?;
    let mss: &mut SchedClassifier = ebpf
        .program_mut(program::DECAP_MSS)
        .with_context(|| {
            format!(
                "program {} is missing from the eBPF object",
                program::DECAP_MSS
            )
        })?
        .try_into()?;
    verify(|| mss.load())
        .with_context(|| format!("loading program {} (kernel verifier)", program::DECAP_MSS))?;
    let mss_link = mss
        .attach_with_options(
            interface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| {
            format!(
                "attaching {} to {interface} (tc egress)",
                program::DECAP_MSS
            )
        })?;
    let list: Vec<String> = vips.iter().map(ToString::to_string).collect();
    println!(
        "attached {} to {interface} (tc ingress): IPIP and IP6IP6 packets to {} are unwrapped; \
         {} (tc egress): SYN-ACKs from them announce at most MSS {} (IPv4) / {} (IPv6) for \
         MTU {mtu}; SIGINT or SIGTERM detaches",
        program::DECAP,
        list.join(", "),
        program::DECAP_MSS,
        max_mss(mtu, true),
        max_mss(mtu, false),
    );
    wait_for_signal()?;
    let mss: &mut SchedClassifier = ebpf
        .program_mut(program::DECAP_MSS)
        .context("the MSS program went missing")?
        .try_into()?;
    mss.detach(mss_link)
        .with_context(|| format!("detaching {} from {interface}", program::DECAP_MSS))?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(program::DECAP)
        .context("the decap program went missing")?
        .try_into()?;
    prog.detach(link)
        .with_context(|| format!("detaching {} from {interface}", program::DECAP))?;
    let sum = |slot: u32| -> u64 {
        counts
            .get(&slot, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    };
    Ok(Counts {
        decapsulated: sum(decap_count::DECAPSULATED),
        malformed: sum(decap_count::MALFORMED),
        not_ours: sum(decap_count::NOT_OURS),
    })
}

/// The MSS a VIP's SYN-ACK may announce so that the client's segments fit
/// `mtu` once wrapped: the MTU less the outer header, the inner IP header
/// and TCP's (IPv4: 20 + 20 + 20; IPv6: 40 + 40 + 20).
pub fn max_mss(mtu: u32, v4: bool) -> u32 {
    let overhead = if v4 { 60 } else { 100 };
    mtu.saturating_sub(overhead)
}

fn mtu_of(interface: &str) -> Result<u32> {
    let path = format!("/sys/class/net/{interface}/mtu");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the MTU of {interface} ({path})"))?;
    text.trim()
        .parse()
        .with_context(|| format!("the MTU of {interface} in {path}: {text:?}"))
}

fn wait_for_signal() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}
