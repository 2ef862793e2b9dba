//! Loading the kernel programs, attaching them to interfaces, and typed
//! handles on their maps.

use std::collections::BTreeMap;

use agent_common::{
    Backend, BackendFib, BackendHealth, EventBudget, Flow, FlowKey, LatencyHistogram, Prefilter,
    Service, ServiceKey, ServicePolicy, ServiceStats,
    registry::{MAPS, Sizing, map, program},
};
use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap, MapData, PerCpuArray, ProgramArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{SchedClassifierLinkId, TcAttachOptions},
        xdp::XdpLinkId,
    },
};
use tracing::{info, warn};

mod maglev_tables;
mod socket_lb;
#[cfg(test)]
mod tests;

pub use maglev_tables::MaglevTables;

use crate::{
    config::{AttachMode, Config},
    pinning::{PinDir, pinned_maps},
};

/// The kernel programs, built by build.rs from agent-ebpf.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice.bpf.o"));

/// What went wrong with the datapath, naming the map or program.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("map {name}: {source}")]
    Map {
        name: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: String },
}

impl DatapathError {
    /// For `map_err`: an error of the map `name`.
    pub fn map(name: &str) -> impl FnOnce(aya::maps::MapError) -> Self + '_ {
        move |source| Self::Map {
            name: name.to_owned(),
            source,
        }
    }
}

/// Reads the kernel programs' aya-log records into the `log` facade.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Map sizes fixed at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub conntrack: u32,
    pub half_open: u32,
    pub services: u32,
    pub backends: u32,
    pub table_size: u32,
    pub affinity: u32,
}

impl Sizes {
    pub fn from_config(config: &Config) -> Self {
        Self {
            conntrack: config.conntrack.max_entries,
            half_open: config.conntrack.half_open_max_entries,
            services: config.limits.max_services,
            backends: config.limits.max_backends,
            table_size: config.maglev.table_size,
            affinity: config.conntrack.affinity_max_entries,
        }
    }

    /// The slot pool every service's table is allocated from (see
    /// `reconcile::slots`); the config's checks keep it in range.
    pub fn maglev_slots(&self) -> u32 {
        crate::reconcile::slots::pool_slots(self.services, self.backends, self.table_size) as u32
    }

    /// The capacity `sizing` gives a map; `None`: as the object declares.
    fn capacity(&self, sizing: Sizing) -> Option<u32> {
        match sizing {
            Sizing::Fixed => None,
            Sizing::Conntrack => Some(self.conntrack),
            Sizing::HalfOpen => Some(self.half_open),
            Sizing::Services => Some(self.services),
            Sizing::Backends => Some(self.backends),
            Sizing::MaglevSlots => Some(self.maglev_slots()),
            Sizing::Affinity => Some(self.affinity),
        }
    }

    /// The maps whose capacity the config sets, with that capacity.
    pub fn capacities(&self) -> Vec<(&'static str, u32)> {
        MAPS.iter()
            .filter_map(|m| Some((m.name, self.capacity(m.sizing)?)))
            .collect()
    }
}

/// Typed handles on every map the agent reads or writes.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: Array<MapData, Backend>,
    pub backend_fib: Array<MapData, BackendFib>,
    pub maglev: MaglevTables,
    pub conntrack: HashMap<MapData, FlowKey, Flow>,
    /// TCP connects until the handshake completes (see the kernel's `HALF_OPEN`).
    pub half_open: HashMap<MapData, FlowKey, Flow>,
    pub prefilter: Array<MapData, Prefilter>,
    pub service_stats: PerCpuArray<MapData, ServiceStats>,
    pub backend_stats: PerCpuArray<MapData, ServiceStats>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub fib_generation: Array<MapData, u32>,
    pub service_policy: Array<MapData, ServicePolicy>,
    pub service_ejected: Array<MapData, u32>,
    pub backend_health: Array<MapData, BackendHealth>,
    pub backend_latency: PerCpuArray<MapData, LatencyHistogram>,
    pub event_budget: PerCpuArray<MapData, EventBudget>,
    pub sock_connects: HashMap<MapData, u64, agent_common::SockConnect>,
    /// Session affinity entries (see the kernel's `affinity`).
    pub affinity: HashMap<MapData, agent_common::AffinityKey, agent_common::AffinityEntry>,
    /// Each backend's active flows of least-connections services (the
    /// kernel's `least_conn`; the sweep corrects it).
    pub backend_active: Array<MapData, u64>,
    /// The services' `allowed_sources` (see `reconcile::ranges`).
    pub source_ranges: aya::maps::LpmTrie<MapData, agent_common::SourceRange, u32>,
}

/// A second handle (a duplicate of its fd) on the map `name` behind `map`,
/// for a reader that must not share the writer's: `wrap` is the map's kind
/// (`Map::PerCpuArray`, ...). A duplicate, not a new fd by the map's id:
/// opening by id needs CAP_SYS_ADMIN, which the agent does without.
pub fn second_handle<K: aya::Pod, V, T>(
    map: &impl IterableMap<K, V>,
    name: &str,
    wrap: fn(MapData) -> aya::maps::Map,
) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    use std::os::fd::AsFd as _;
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|io_error| aya::sys::SyscallError {
            call: "dup",
            io_error,
        })
        .map_err(aya::maps::MapError::from)
        .map_err(DatapathError::map(name))?;
    let data = MapData::from_fd(fd).map_err(DatapathError::map(name))?;
    T::try_from(wrap(data)).map_err(DatapathError::map(name))
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T, DatapathError> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::MissingMap {
            name: name.to_owned(),
        })?;
    T::try_from(map).map_err(DatapathError::map(name))
}

impl Maps {
    fn take_all(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            services: take(ebpf, map::SERVICES)?,
            backends: take(ebpf, map::BACKENDS)?,
            backend_fib: take(ebpf, map::BACKEND_FIB)?,
            maglev: MaglevTables::map(ebpf)?,
            conntrack: take(ebpf, map::CONNTRACK)?,
            half_open: take(ebpf, map::HALF_OPEN)?,
            prefilter: take(ebpf, map::PREFILTER)?,
            service_stats: take(ebpf, map::SERVICE_STATS)?,
            backend_stats: take(ebpf, map::BACKEND_STATS)?,
            reasons: take(ebpf, map::REASONS)?,
            fib_generation: take(ebpf, map::FIB_GENERATION)?,
            service_policy: take(ebpf, map::SERVICE_POLICY)?,
            service_ejected: take(ebpf, map::SERVICE_EJECTED)?,
            backend_health: take(ebpf, map::BACKEND_HEALTH)?,
            backend_latency: take(ebpf, map::BACKEND_LATENCY)?,
            event_budget: take(ebpf, map::EVENT_BUDGET)?,
            sock_connects: take(ebpf, map::SOCK_CONNECTS)?,
            affinity: take(ebpf, map::AFFINITY)?,
            backend_active: take(ebpf, map::BACKEND_ACTIVE)?,
            source_ranges: take(ebpf, map::SOURCE_RANGES)?,
        })
    }
}

/// How a program got attached to one interface.
enum Link {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
    /// A link pinned under bpffs: it stays attached without us. Detaching
    /// removes the pin, then closes our handle.
    Pinned(aya::programs::links::FdLink, std::path::PathBuf),
}

/// The loaded object and its attachments. Dropping it detaches everything
/// that is not pinned.
pub struct Datapath {
    ebpf: Ebpf,
    /// The program arrays (XDP, TC) from which the XDP and TC programs
    /// tail-call the programs that turn a refusal into the client's SYN
    /// towards the next backend. Held open: the kernel empties a program
    /// array when its last user handle closes. `None` for an object
    /// without them.
    resyn: Option<[ProgramArray<MapData>; 2]>,
    /// The tail-call slots of tunnelled DSR's wrapping (see `encap`), the
    /// TC one filled when the TC program is first loaded. None: an object
    /// without it (tunnelled DSR packets are then dropped, counted).
    encap: Option<[ProgramArray<MapData>; 2]>,
    links: BTreeMap<String, (AttachMode, AttachMode, Link)>,
    tc_loaded: bool,
    pins: Option<PinDir>,
    /// The maps were pinned by an earlier agent and now adopted.
    pub adopted: bool,
}

impl Datapath {
    /// Loads (and verifies) the programs of `object` (`EBPF_OBJECT`, or
    /// another build: benchmarks compare them, upgrades bring one) with maps
    /// sized for `sizes`, pinned in `pins` (adopted when an earlier agent
    /// pinned them). Returns the datapath and its maps, which the caller
    /// owns separately.
    pub fn load_object(sizes: Sizes, object: &[u8], pins: Option<PinDir>) -> Result<(Self, Maps)> {
        let capacities = sizes.capacities();
        let mut loader = EbpfLoader::new();
        let mut adopted = false;
        if let Some(pins) = &pins {
            adopted = pins.has_maps();
            pins.check_maps(object, &capacities)?;
            for name in pinned_maps() {
                loader.map_pin_path(name, pins.map_path(name));
            }
        }
        for &(name, capacity) in &capacities {
            loader.map_max_entries(name, capacity);
        }
        // SLUICE_VERIFIER_LOG=1: the kernel verifier's full log on a refusal.
        if std::env::var_os("SLUICE_VERIFIER_LOG").is_some() {
            loader
                .verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS);
        }
        let mut ebpf = loader
            .load(object)
            .context("loading the eBPF object (maps)")?;
        let xdp: &mut Xdp = program(&mut ebpf, program::XDP)?;
        verify(|| xdp.load())
            .with_context(|| format!("loading program {} (kernel verifier)", program::XDP))?;
        // An object without them (an older build, loaded to compare or
        // upgrade) keeps the retransmission-based retry.
        let resyn = match ebpf.program(program::RESYN_XDP) {
            Some(_) => {
                let mut xdp: ProgramArray<MapData> = take(&mut ebpf, map::RESYN_XDP)?;
                let tc: ProgramArray<MapData> = take(&mut ebpf, map::RESYN_TC)?;
                let resyn: &mut Xdp = program(&mut ebpf, program::RESYN_XDP)?;
                verify(|| resyn.load()).with_context(|| {
                    format!("loading program {} (kernel verifier)", program::RESYN_XDP)
                })?;
                xdp.set(0, resyn.fd()?, 0)
                    .map_err(DatapathError::map(map::RESYN_XDP))?;
                Some([xdp, tc])
            }
            None => {
                warn!(
                    "the eBPF object has no {}: a refused connect is retried when the client sends its SYN again",
                    program::RESYN_XDP
                );
                None
            }
        };
        let encap = match ebpf.program(program::ENCAP_XDP) {
            Some(_) => {
                let mut xdp: ProgramArray<MapData> = take(&mut ebpf, map::ENCAP_XDP)?;
                let tc: ProgramArray<MapData> = take(&mut ebpf, map::ENCAP_TC)?;
                let encap: &mut Xdp = program(&mut ebpf, program::ENCAP_XDP)?;
                verify(|| encap.load()).with_context(|| {
                    format!("loading program {} (kernel verifier)", program::ENCAP_XDP)
                })?;
                xdp.set(0, encap.fd()?, 0)
                    .map_err(DatapathError::map(map::ENCAP_XDP))?;
                Some([xdp, tc])
            }
            None => None,
        };
        let maps = Maps::take_all(&mut ebpf)?;
        Ok((
            Self {
                ebpf,
                resyn,
                encap,
                links: BTreeMap::new(),
                tc_loaded: false,
                pins,
                adopted,
            },
            maps,
        ))
    }

    /// The connection events ring buffer; the caller reads it.
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        Ok(take(&mut self.ebpf, map::EVENTS)?)
    }

    /// The aya-log ring buffer, if the programs log; the caller drains it.
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!(error = %e, "kernel log records are not available");
                None
            }
        }
    }

    /// The mode each interface got, by interface name.
    pub fn attachments(&self) -> BTreeMap<String, AttachMode> {
        self.links
            .iter()
            .map(|(name, (_, got, _))| (name.clone(), *got))
            .collect()
    }

    /// Attaches to `interface` in the requested mode and returns the mode it
    /// got: `auto` tries the modes that forward on that device, best first
    /// (`netdev::auto_order`); an explicit mode that can't forward there is
    /// refused with the reason. An interface already attached in the same
    /// requested mode is left as it is.
    pub fn attach(&mut self, interface: &str, requested: AttachMode) -> Result<AttachMode> {
        if let Some((was, got, _)) = self.links.get(interface) {
            if *was == requested {
                return Ok(*got);
            }
            self.detach(interface)?;
        }
        if let Some(why) = crate::netdev::cannot_forward(interface, requested) {
            return Err(anyhow!("attaching to interface {interface} refused: {why}"));
        }
        if let Some(mode) = self.adopt_link(interface, requested)? {
            return Ok(mode);
        }
        let order: &[AttachMode] = match requested {
            AttachMode::Auto => {
                let (order, why) = crate::netdev::auto_order(interface);
                info!(interface, modes = ?order, why, "auto attach: modes to try");
                order
            }
            AttachMode::XdpNative => &[AttachMode::XdpNative],
            AttachMode::XdpGeneric => &[AttachMode::XdpGeneric],
            AttachMode::Tc => &[AttachMode::Tc],
        };

        let mut errors = Vec::new();
        for &mode in order {
            match self
                .attach_one(interface, mode)
                .and_then(|link| self.pin_link(interface, mode, link))
            {
                Ok(link) => {
                    info!(interface, mode = %mode, requested = %requested, "attached");
                    self.links
                        .insert(interface.to_string(), (requested, mode, link));
                    return Ok(mode);
                }
                Err(e) => {
                    if requested == AttachMode::Auto {
                        info!(interface, mode = %mode, error = format!("{e:#}"), "attach mode unavailable, trying the next");
                    }
                    errors.push(format!("{mode}: {e:#}"));
                }
            }
        }
        Err(anyhow!(
            "attaching to interface {interface} failed ({})",
            errors.join("; ")
        ))
    }

    fn attach_one(&mut self, interface: &str, mode: AttachMode) -> Result<Link> {
        match mode {
            AttachMode::XdpNative | AttachMode::XdpGeneric => {
                let xdp_mode = if mode == AttachMode::XdpNative {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                let xdp: &mut Xdp = program(&mut self.ebpf, program::XDP)?;
                Ok(Link::Xdp(xdp.attach(interface, xdp_mode)?))
            }
            AttachMode::Tc => {
                let tc = self.tc_program()?;
                // tcx links (kernel ≥ 6.6) need no qdisc and go away with the fd.
                Ok(Link::Tc(tc.attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )?))
            }
            AttachMode::Auto => unreachable!("auto is expanded by attach()"),
        }
    }

    pub fn detach(&mut self, interface: &str) -> Result<()> {
        let Some((_, got, link)) = self.links.remove(interface) else {
            return Ok(());
        };
        match link {
            Link::Xdp(id) => program::<Xdp>(&mut self.ebpf, program::XDP)?.detach(id)?,
            Link::Tc(id) => program::<SchedClassifier>(&mut self.ebpf, program::TC)?.detach(id)?,
            Link::Pinned(fd, path) => {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing pin {}", path.display()))?;
                drop(fd);
            }
        }
        info!(interface, mode = %got, "detached");
        Ok(())
    }

    /// With pinning: links an earlier agent pinned on interfaces the config
    /// no longer names are removed (their programs detach).
    pub fn prune_pinned_links(&mut self, configured: &[String]) -> Result<()> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        for (interface, path) in pins.pinned_links()? {
            if !configured.contains(&interface) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing pin {}", path.display()))?;
                info!(
                    interface,
                    "pinned attachment removed: the interface is no longer configured"
                );
            }
        }
        Ok(())
    }

    /// With pinning: the link of a fresh attachment is pinned, so it stays
    /// attached after the agent exits.
    fn pin_link(&mut self, interface: &str, mode: AttachMode, link: Link) -> Result<Link> {
        let Some(pins) = &self.pins else {
            return Ok(link);
        };
        let path = pins.link_path(interface, mode);
        if let Link::Pinned(..) = link {
            return Ok(link);
        }
        let pinned = self
            .take_fd_link(link)?
            .pin(&path)
            .with_context(|| format!("pinning the link of {interface} at {}", path.display()))?;
        Ok(Link::Pinned(pinned.into(), path))
    }

    /// The bpf_link of an attachment, taken from the program that owns it
    /// (a pin, or our handle, keeps it from then on).
    fn take_fd_link(&mut self, link: Link) -> Result<aya::programs::links::FdLink> {
        Ok(match link {
            Link::Xdp(id) => program::<Xdp>(&mut self.ebpf, program::XDP)?
                .take_link(id)?
                .try_into()
                .context("an XDP attachment without a bpf_link can't be pinned")?,
            Link::Tc(id) => program::<SchedClassifier>(&mut self.ebpf, program::TC)?
                .take_link(id)?
                .try_into()
                .context("a TC attachment without a tcx link can't be pinned")?,
            Link::Pinned(fd, _) => fd,
        })
    }

    /// The TC program, loaded (verified) on first use.
    fn tc_program(&mut self) -> Result<&mut SchedClassifier> {
        let tc: &mut SchedClassifier = program(&mut self.ebpf, program::TC)?;
        if !self.tc_loaded {
            verify(|| tc.load())
                .with_context(|| format!("loading program {} (kernel verifier)", program::TC))?;
            if let Some([_, resyn_tc]) = &mut self.resyn {
                let resyn: &mut SchedClassifier = program(&mut self.ebpf, program::RESYN_TC)?;
                verify(|| resyn.load()).with_context(|| {
                    format!("loading program {} (kernel verifier)", program::RESYN_TC)
                })?;
                resyn_tc
                    .set(0, resyn.fd()?, 0)
                    .map_err(DatapathError::map(map::RESYN_TC))?;
            }
            if let Some([_, encap_tc]) = &mut self.encap {
                let encap: &mut SchedClassifier = program(&mut self.ebpf, program::ENCAP_TC)?;
                verify(|| encap.load()).with_context(|| {
                    format!("loading program {} (kernel verifier)", program::ENCAP_TC)
                })?;
                encap_tc
                    .set(0, encap.fd()?, 0)
                    .map_err(DatapathError::map(map::ENCAP_TC))?;
            }
            self.tc_loaded = true;
        }
        program(&mut self.ebpf, program::TC)
    }

    /// With pinning: an interface whose link an earlier agent pinned gets
    /// this build's program swapped into that link atomically (bpf_link
    /// update): no packet goes unprocessed, the pinned maps carry every
    /// connection over. Returns the mode, or None to attach afresh.
    fn adopt_link(&mut self, interface: &str, requested: AttachMode) -> Result<Option<AttachMode>> {
        let Some((mode, path)) = self.pins.as_ref().and_then(|p| p.pinned_link(interface)) else {
            return Ok(None);
        };
        let fd: aya::programs::links::FdLink = aya::programs::links::PinnedLink::from_pin(&path)
            .with_context(|| format!("opening pinned link {}", path.display()))?
            .into();
        let wanted = match requested {
            AttachMode::Auto => crate::netdev::auto_order(interface).0.contains(&mode),
            requested => requested == mode,
        };
        if !wanted {
            // Another mode is wanted: the old link goes first (an interface
            // takes one XDP program), so this change has a short gap.
            std::fs::remove_file(&path)
                .with_context(|| format!("removing pin {}", path.display()))?;
            info!(interface, was = %mode, requested = %requested, "pinned attachment in another mode replaced");
            return Ok(None);
        }
        let replaced = match mode {
            AttachMode::Tc => {
                let tc = self.tc_program()?;
                aya::programs::tc::SchedClassifierLink::try_from(fd)
                    .map_err(anyhow::Error::from)
                    .and_then(|link| Ok(Link::Tc(tc.attach_to_link(link)?)))
            }
            _ => {
                let xdp: &mut Xdp = program(&mut self.ebpf, program::XDP)?;
                aya::programs::xdp::XdpLink::try_from(fd)
                    .map_err(anyhow::Error::from)
                    .and_then(|link| Ok(Link::Xdp(xdp.attach_to_link(link)?)))
            }
        };
        match replaced {
            Ok(link) => {
                // The program now owns an fd of the link; the pin keeps it.
                let link = Link::Pinned(self.take_fd_link(link)?, path);
                info!(interface, mode = %mode, "adopted the pinned attachment; program replaced in place");
                self.links
                    .insert(interface.to_string(), (requested, mode, link));
                Ok(Some(mode))
            }
            Err(e) => {
                // E.g. the interface was recreated: the old link is defunct.
                let _ = std::fs::remove_file(&path);
                info!(
                    interface,
                    error = format!("{e:#}"),
                    "pinned attachment unusable; attaching afresh"
                );
                Ok(None)
            }
        }
    }

    /// The program to run with BPF_PROG_TEST_RUN (tests and benchmarks).
    pub fn xdp_program(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, program::XDP)
    }

    /// Instructions the kernel's verifier processed for the XDP and the TC
    /// program (the TC program is loaded for it): its limit is 1,000,000,
    /// and a program near it fails to load after a small change.
    pub fn verified_instructions(&mut self) -> Result<(u32, u32)> {
        let count =
            |info: aya::programs::ProgramInfo| info.verified_instruction_count().unwrap_or(0);
        let xdp = count(self.xdp_program()?.info()?);
        let tc = count(self.tc_program()?.info()?);
        Ok((xdp, tc))
    }

    /// As `verified_instructions`, for the programs they tail-call to turn
    /// a refusal into the client's SYN (XDP, TC).
    pub fn resyn_verified_instructions(&mut self) -> Result<(u32, u32)> {
        self.tc_program()?; // loads the TC one
        let count =
            |info: aya::programs::ProgramInfo| info.verified_instruction_count().unwrap_or(0);
        let xdp = count(program::<Xdp>(&mut self.ebpf, program::RESYN_XDP)?.info()?);
        let tc = count(program::<SchedClassifier>(&mut self.ebpf, program::RESYN_TC)?.info()?);
        Ok((xdp, tc))
    }

    /// As `verified_instructions`, for the programs they tail-call to wrap
    /// a tunnelled DSR packet (XDP, TC).
    pub fn encap_verified_instructions(&mut self) -> Result<(u32, u32)> {
        self.tc_program()?; // loads the TC one
        let count =
            |info: aya::programs::ProgramInfo| info.verified_instruction_count().unwrap_or(0);
        let xdp = count(program::<Xdp>(&mut self.ebpf, program::ENCAP_XDP)?.info()?);
        let tc = count(program::<SchedClassifier>(&mut self.ebpf, program::ENCAP_TC)?.info()?);
        Ok((xdp, tc))
    }

    /// Raw access for tests and benchmarks that load extra programs.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// Loads a program, again if the kernel's verifier was interrupted: it
/// gives up with EAGAIN when a signal arrives while it works (a child
/// process of this one ending, say), which says nothing of the program.
pub(crate) fn verify(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut attempts = 0;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts < 5 =>
            {
                attempts += 1;
            }
            result => return result,
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} is missing from the eBPF object"))?;
    program
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}
