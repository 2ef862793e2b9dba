//! `sluice run`: start-up, the reload loop and shutdown.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::{self, ConfigError, Validated},
    datapath::{Datapath, Sizes, second_handle},
    reconcile::Reconciler,
    refusal::Refusal,
    state::Shared,
    sysctl::Sysctls,
    writer::Writer,
};

/// How often the config file is checked for changes. Polling the content sees
/// every way a file changes (in place, rename, symlink swap as a Kubernetes
/// ConfigMap volume does) with no inotify edge cases.
const RELOAD_POLL: Duration = Duration::from_secs(1);

/// Why `run` failed: the caller maps these to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The host is not set up as the agent needs (pin directory ownership,
    /// a kernel setting it can't change): refused like a bad config.
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl From<anyhow::Error> for RunError {
    /// A refusal keeps its kind through `anyhow` (and `?`).
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<Refusal>() {
            Ok(refusal) => Self::Refused(refusal),
            Err(other) => Self::Other(other),
        }
    }
}

/// Interfaces named in the config must exist: refused like any bad value.
/// Globs and `auto` may match nothing yet: devices that appear later are
/// attached when they appear.
pub fn check_interfaces(cfg: &Validated, path: &Path) -> Result<(), ConfigError> {
    for (i, iface) in cfg.raw.interfaces.iter().enumerate() {
        if crate::netdev::is_pattern(&iface.name) {
            continue;
        }
        if crate::netdev::ifindex(&iface.name) == 0 {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                field: format!("interfaces[{i}].name"),
                value: iface.name.clone(),
                why: "no such network interface".into(),
            });
        }
    }
    Ok(())
}

/// `http`: the listeners and their limits. `object`: a build of the kernel
/// programs to run instead of the one built in (a datapath upgrade on its
/// own; tests use it).
pub async fn run(
    config_path: PathBuf,
    http: crate::http::Options,
    object: Option<PathBuf>,
    control_paths: crate::control::PathFlags,
) -> Result<(), RunError> {
    // One read: what is parsed is what later reads are compared with, so an
    // edit made during start-up is not missed.
    let mut last_text = std::fs::read(&config_path).map_err(|source| ConfigError::Read {
        path: config_path.display().to_string(),
        source,
    })?;
    let cfg = config::parse(
        &String::from_utf8_lossy(&last_text),
        &config_path.display().to_string(),
    )?;
    check_interfaces(&cfg, &config_path)?;

    // Overrides first: an agent that can't read them must not start and
    // send traffic to backends an operator drained.
    let overrides = crate::control::overrides::Overrides::load(
        &control_paths.state_directory(&cfg.raw.control),
    )?;
    let shared = Arc::new(Shared {
        http: Arc::new(crate::http::Load::new(http.max_event_streams.get())),
        overrides: std::sync::Mutex::new(overrides),
        pin_directory: cfg.raw.pinning.as_ref().map(|p| p.directory.clone()),
        ..Shared::default()
    });
    let registry = crate::metrics::registry().context("registering metrics")?;
    let router = crate::api::router(shared.clone(), registry.clone());
    let server = crate::http::Server::start(&http, router, shared.http.clone()).await?;
    let (control_tx, mut control_requests) = tokio::sync::mpsc::channel(16);
    let control = crate::control::socket::ControlSocket::start(
        &control_paths.socket(&cfg.raw.control),
        crate::api::control_router(shared.clone(), registry, control_tx),
    )
    .await?;

    let sizes = Sizes::from_config(&cfg.raw);
    let pins = match &cfg.raw.pinning {
        Some(p) => Some(crate::pinning::PinDir::prepare(Path::new(&p.directory))?),
        None => None,
    };
    // Kernel settings before anything is loaded: one that can't be had
    // refuses start-up with nothing attached or pinned.
    let mut devices = crate::netdev::resolve(&cfg.raw.interfaces);
    let mut sysctls = Sysctls::default();
    sysctls.apply(&cfg, &device_names(&devices))?;
    let object_bytes = match &object {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("reading eBPF object {}", path.display()))?,
        ),
        None => None,
    };
    let (mut datapath, maps) = Datapath::load_object(
        sizes,
        object_bytes
            .as_deref()
            .unwrap_or(crate::datapath::EBPF_OBJECT),
        pins,
    )?;
    drop(object_bytes);
    if let Some(logger) = datapath.take_logger() {
        spawn_kernel_log_reader(logger)?;
    }
    crate::events::spawn_reader(datapath.take_events()?, shared.clone())?;
    for device in &devices {
        datapath.attach(&device.name, device.attach)?;
    }
    datapath.prune_pinned_links(&device_names(&devices))?;
    match &cfg.raw.socket_lb {
        Some(s) => datapath.attach_socket_lb(Path::new(&s.cgroup))?,
        None => datapath.remove_pinned_socket_lb()?,
    }
    *shared.attachments.lock().unwrap() = datapath.attachments();
    shared
        .conntrack_capacity
        .store(sizes.conntrack, Ordering::Relaxed);
    // Route, neighbour and link changes: FIB caches and devices refreshed.
    let net_changes = crate::netlink::watch().context("watching rtnetlink")?;
    *shared.conntrack_timeouts.lock().unwrap() = cfg.raw.conntrack.timeouts;
    *shared.metrics.lock().unwrap() = cfg.raw.metrics.clone();
    // The sweep walks the conntrack maps on handles of its own.
    let conntrack = second_handle(
        &maps.conntrack,
        agent_common::registry::map::CONNTRACK,
        aya::maps::Map::LruHashMap,
    )
    .map_err(anyhow::Error::from)?;
    let half_open = second_handle(
        &maps.half_open,
        agent_common::registry::map::HALF_OPEN,
        aya::maps::Map::LruHashMap,
    )
    .map_err(anyhow::Error::from)?;
    shared
        .half_open_capacity
        .store(sizes.half_open, Ordering::Relaxed);
    let backend_active = second_handle(
        &maps.backend_active,
        agent_common::registry::map::BACKEND_ACTIVE,
        aya::maps::Map::Array,
    )
    .map_err(anyhow::Error::from)?;
    let mut reconciler = Reconciler::new(maps, sizes.table_size, sizes.services, sizes.backends)?;
    reconciler.set_new_flows_per_second(cfg.raw.limits.new_flows_per_second);
    // The loop below is the one writer; everything else reads `view`.
    let mut writer = Writer::new(reconciler)?;
    let view = writer.view();
    let _ = shared.view.set(view.clone());
    crate::sweep::spawn(
        crate::sweep::Tables {
            conntrack,
            conntrack_capacity: sizes.conntrack,
            half_open,
            half_open_capacity: sizes.half_open,
            active: crate::sweep::ActiveCounts {
                map: backend_active,
                capacity: sizes.backends,
                suspect: Default::default(),
            },
        },
        shared.clone(),
        view,
    );
    // Discovery services start with no backends (or what pinned maps hold,
    // once adopted) and fill in as their providers report.
    let (report_tx, mut reports) = tokio::sync::mpsc::channel(256);
    {
        let mut hub = shared.discovery.lock().unwrap();
        // Kubernetes Services are fitted into what these maps hold.
        hub.set_capacity(sizes.services, sizes.backends);
        hub.sync(&cfg, &report_tx);
    }
    if datapath.adopted {
        let adopted = writer.adopt(&cfg.services)?;
        let mut hub = shared.discovery.lock().unwrap();
        for (service, backends) in adopted.found {
            hub.seed(&service, &backends);
        }
        // The Kubernetes services of the last run keep serving until the
        // provider's first answer renames them (by frontend) or drops them.
        hub.seed_kubernetes(adopted.orphans);
    }
    writer.apply(&desired_state(&shared, &cfg))?;
    shared.ready.store(true, Ordering::SeqCst);
    info!(
        config = %config_path.display(),
        services = cfg.services.len(),
        // Set from the downward API in the DaemonSet.
        node = std::env::var("NODE_NAME").unwrap_or_default(),
        "ready"
    );

    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    // SIGHUP: read the config now instead of at the next poll.
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut ticker = tokio::time::interval(RELOAD_POLL);
    let mut health_ticker = tokio::time::interval(crate::readmit::POLL);
    let mut readmitter = crate::readmit::Readmitter::default();
    let mut current = cfg;
    // What the interfaces resolved to last: a device that could not be
    // attached is retried when that changes (it appears, is made again, or
    // the config changes), not at every route or neighbour change.
    let mut resolved = devices.clone();
    // The host's addresses the config file's NodePorts listen on by
    // default: an address added or removed re-applies the services.
    let mut node_addresses = crate::nodeport::host_node_addresses();
    loop {
        tokio::select! {
            _ = net_changes.notified() => {
                if let Err(e) = writer.bump_fib_generation() {
                    warn!(error = format!("{e:#}"), "FIB cache generation not bumped");
                }
                let next = crate::netdev::resolve(&current.raw.interfaces);
                if next != resolved {
                    resolved = next.clone();
                    devices = follow_devices(&mut datapath, &devices, next);
                    if let Err(e) = sysctls.apply(&current, &device_names(&devices)) {
                        warn!(error = format!("{e:#}"), "kernel settings for new interfaces");
                    }
                    *shared.attachments.lock().unwrap() = datapath.attachments();
                }
                let now = crate::nodeport::host_node_addresses();
                if now != node_addresses {
                    node_addresses = now;
                    let follows = current.raw.node.addresses.is_none()
                        && current.services.iter().any(|s| s.node_port.is_some());
                    if follows && let Err(e) = apply_desired(&mut writer, &shared, &current) {
                        error!(error = format!("{e:#}"), "node ports not moved to the node's new addresses; the last applied set keeps serving");
                    }
                }
            }
            _ = health_ticker.tick() => {
                readmitter.tick(&mut writer).await;
                writer.finish_drains(std::time::Instant::now());
                writer.resolve_dsr_neighbours();
            }
            Some(report) = reports.recv() => {
                let service = report.service.clone();
                let changed = shared.discovery.lock().unwrap().accept(report, &current);
                if changed && let Err(e) = apply_desired(&mut writer, &shared, &current) {
                    let why = format!("{e:#}");
                    error!(service, error = why, "discovered backends not applied; the last applied set keeps serving");
                    shared.discovery.lock().unwrap().revert(&service, &why);
                }
            }
            Some(request) = control_requests.recv() => {
                let answer = change_override(&mut writer, &shared, &current, &request.change);
                let _ = request.reply.send(answer.map_err(|e| format!("{e:#}")));
            }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = async {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = sighup.recv() => {}
                }
            } => {
                let Ok(text) = std::fs::read(&config_path) else { continue };
                if text == last_text {
                    continue;
                }
                let result = reload(&config_path, &text, &current, &mut devices, &mut datapath, &mut sysctls, &mut writer, &shared, &report_tx);
                last_text = text;
                match result {
                    Ok(Some(next)) => {
                        current = next;
                        resolved = devices.clone();
                    }
                    Ok(None) => {}
                    Err(e) => error!(config = %config_path.display(), error = %e, "config change rejected; the last good config keeps serving"),
                }
            }
        }
    }

    shared.ready.store(false, Ordering::SeqCst);
    shared.stopping.store(true, Ordering::SeqCst);
    shared.discovery.lock().unwrap().stop();
    server.stop();
    control.stop();
    // Dropping the datapath closes every link: the programs detach, unless
    // pinned. A pinned datapath keeps forwarding (and needs its sysctls).
    drop(writer);
    drop(datapath);
    match &current.raw.pinning {
        Some(p) => {
            sysctls.keep();
            info!(
                directory = p.directory,
                "the pinned datapath keeps forwarding; the next agent adopts it (`sluice cleanup` removes it); bye"
            )
        }
        None => {
            sysctls.restore();
            info!("detached; bye");
        }
    }
    server.stopped().await;
    Ok(())
}

/// Applies a changed config file. Returns the new config once applied.
#[expect(
    clippy::too_many_arguments,
    reason = "the reload loop's state, passed as it is"
)]
fn reload(
    path: &Path,
    text: &[u8],
    current: &Validated,
    devices: &mut Vec<crate::netdev::Device>,
    datapath: &mut Datapath,
    sysctls: &mut Sysctls,
    writer: &mut Writer,
    shared: &Shared,
    report_tx: &tokio::sync::mpsc::Sender<crate::discovery::Report>,
) -> Result<Option<Validated>> {
    let started = std::time::Instant::now();
    let next = config::parse(&String::from_utf8_lossy(text), &path.display().to_string())?;
    check_interfaces(&next, path)?;
    if next == *current {
        return Ok(None);
    }
    let parsed = started.elapsed();
    if Sizes::from_config(&next.raw) != Sizes::from_config(&current.raw)
        || next.raw.limits != current.raw.limits
    {
        warn!("conntrack, maglev or limits settings changed: they take effect at the next restart");
    }
    if next.raw.pinning != current.raw.pinning
        || next.raw.socket_lb != current.raw.socket_lb
        || next.raw.control != current.raw.control
    {
        warn!("pinning, socket_lb or control changed: it takes effect at the next restart");
    }
    // Interfaces: kernel settings first (a change that needs one that
    // can't be had is rejected with nothing changed), then attach the new
    // ones, then detach those removed.
    let next_devices = crate::netdev::resolve(&next.raw.interfaces);
    sysctls.apply(&next, &device_names(&next_devices))?;
    for device in &next_devices {
        datapath.attach(&device.name, device.attach)?;
    }
    for old in devices.iter() {
        if !next_devices.iter().any(|d| d.name == old.name) {
            datapath.detach(&old.name)?;
        }
    }
    *devices = next_devices;
    *shared.attachments.lock().unwrap() = datapath.attachments();
    shared.discovery.lock().unwrap().sync(&next, report_tx);
    let before_apply = started.elapsed();
    if let Err(e) = apply_desired(writer, shared, &next) {
        // Back to the providers of the config that keeps serving.
        shared.discovery.lock().unwrap().sync(current, report_tx);
        return Err(e);
    }
    shared.discovery.lock().unwrap().prune(&next);
    *shared.conntrack_timeouts.lock().unwrap() = next.raw.conntrack.timeouts;
    *shared.metrics.lock().unwrap() = next.raw.metrics.clone();
    info!(
        config = %path.display(),
        services = next.services.len(),
        parse_ms = parsed.as_millis() as u64,
        apply_ms = (started.elapsed() - before_apply).as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "config change applied"
    );
    Ok(Some(next))
}

fn device_names(devices: &[crate::netdev::Device]) -> Vec<String> {
    devices.iter().map(|d| d.name.clone()).collect()
}

/// Devices came, went or were made again (new ifindex): attaches to the new
/// ones, lets go of those gone. Returns the devices now attached. A device
/// that can't be attached is logged and left out (it is retried at the next
/// change); it never stops the agent.
fn follow_devices(
    datapath: &mut Datapath,
    current: &[crate::netdev::Device],
    next: Vec<crate::netdev::Device>,
) -> Vec<crate::netdev::Device> {
    for old in current {
        if !next.contains(old) {
            match datapath.detach(&old.name) {
                Ok(()) => info!(interface = old.name, "interface gone or made again: let go"),
                Err(e) => warn!(interface = old.name, error = format!("{e:#}"), "detaching"),
            }
        }
    }
    let mut attached = Vec::new();
    for device in next {
        if current.contains(&device) {
            attached.push(device);
            continue;
        }
        match datapath.attach(&device.name, device.attach) {
            Ok(mode) => {
                info!(interface = device.name, mode = %mode, "interface appeared: attached");
                attached.push(device);
            }
            Err(e) => warn!(
                interface = device.name,
                error = format!("{e:#}"),
                "interface appeared but can't be attached"
            ),
        }
    }
    attached
}

/// The config merged with the discovered backends, into the kernel maps.
fn apply_desired(writer: &mut Writer, shared: &Shared, config: &Validated) -> Result<()> {
    writer.apply(&desired_state(shared, config))
}

/// What the maps must hold: the config's services with the discovered
/// backends, and the operators' overrides on top.
fn desired_state(shared: &Shared, config: &Validated) -> Vec<config::ServiceSpec> {
    let mut desired = shared.discovery.lock().unwrap().desired(config);
    shared.overrides.lock().unwrap().apply(&mut desired);
    desired
}

/// `sluice drain|undrain|weight`: checked against the services as they are
/// now, kept, then applied. An apply that fails puts the overrides back.
fn change_override(
    writer: &mut Writer,
    shared: &Shared,
    config: &Validated,
    change: &crate::control::overrides::Change,
) -> Result<crate::control::overrides::Entry> {
    let desired = shared.discovery.lock().unwrap().desired(config);
    let (before, value) = {
        let mut overrides = shared.overrides.lock().unwrap();
        let before = overrides.clone();
        let value = overrides.change(change, &desired)?;
        (before, value)
    };
    if let Err(e) = apply_desired(writer, shared, config) {
        let mut overrides = shared.overrides.lock().unwrap();
        *overrides = before;
        overrides.save_quietly();
        return Err(e.context("override not applied; the last applied state keeps serving"));
    }
    info!(
        service = change.service,
        backend = %change.backend,
        action = ?change.action,
        "override changed"
    );
    Ok(crate::control::overrides::Entry {
        service: change.service.clone(),
        backend: change.backend,
        value,
    })
}

/// Forwards aya-log records from the kernel into `log`, which tracing picks up.
fn spawn_kernel_log_reader(logger: crate::datapath::KernelLogger) -> Result<()> {
    // SAFETY: the logger owns its ring buffer fd and the AsyncFd owns the
    // logger, so the fd stays open and the same for the AsyncFd's whole life.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow!("watching the kernel log ring buffer: {}", e))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
