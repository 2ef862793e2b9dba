//! Helpers for Sluice's integration tests: running the real `sluice` binary in
//! a namespace, talking HTTP to it, and writing configs.

pub mod bench;
pub mod fib;
pub mod flood;
pub mod fuzz;
pub mod helm;
pub mod http1;
pub mod kube_mock;
pub mod packet;
pub mod raw;
pub mod soak;
pub mod webdriver;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use testbed::Netns;

/// The `sluice` binary under test: `SLUICE_BIN`, or next to the test binary.
pub fn sluice_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // A test: target/<profile>/deps/<test>; a benchmark binary:
    // target/<profile>/<bench>. Either way: target/<profile>/sluice.
    let mut dir = exe.parent().expect("target directory layout");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target directory layout");
    }
    dir.join("sluice")
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(testbed::unique(&format!("sluice-{tag}-")));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `sluice run` inside a namespace. Dropping it sends SIGTERM
/// (SIGKILL after 5 s) to the process it started, and to nothing else.
pub struct Agent {
    child: Option<Child>,
    pub listen: SocketAddr,
    pub ns: String,
    pub log: PathBuf,
}

impl Agent {
    /// Starts the agent on `config` in `ns` and waits until /readyz says 200.
    pub fn start(ns: &Netns, config: &Path, log: PathBuf) -> Result<Self> {
        Self::start_with(ns, config, log, &[])
    }

    /// As `start`, with more arguments for `sluice run`.
    pub fn start_with(ns: &Netns, config: &Path, log: PathBuf, extra: &[&str]) -> Result<Self> {
        Self::start_on(ns, config, log, "127.0.0.1:9464".parse()?, extra)
    }

    /// As `start_with`, with `--listen` at `listen` (where /readyz is
    /// polled).
    pub fn start_on(
        ns: &Netns,
        config: &Path,
        log: PathBuf,
        listen: SocketAddr,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_wrapped_on(ns, &[], config, log, listen, extra)
    }

    /// As `start_with`, the agent run through `wrapper` inside the
    /// namespace (see `agent_command`).
    pub fn start_wrapped(
        ns: &Netns,
        wrapper: &[&str],
        config: &Path,
        log: PathBuf,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_wrapped_on(ns, wrapper, config, log, "127.0.0.1:9464".parse()?, extra)
    }

    fn start_wrapped_on(
        ns: &Netns,
        wrapper: &[&str],
        config: &Path,
        log: PathBuf,
        listen: SocketAddr,
        extra: &[&str],
    ) -> Result<Self> {
        let log_file = std::fs::File::create(&log)?;
        let child = agent_command(ns, wrapper, config, listen, extra)
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting sluice")?;
        let mut agent = Self {
            child: Some(child),
            listen,
            ns: ns.name.clone(),
            log,
        };
        agent.wait_ready(ns)?;
        Ok(agent)
    }

    fn wait_ready(&mut self, ns: &Netns) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!(
                    "sluice exited with {status} before it was ready:\n{}",
                    self.log_text()
                );
            }
            if let Ok((200, _)) = http_get(ns, self.listen, "/readyz") {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!("sluice not ready within 60 s:\n{}", self.log_text())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGHUP: the agent reads its config file now instead of at its next
    /// poll.
    pub fn reload(&self) -> Result<()> {
        let child = self.child.as_ref().context("sluice was already stopped")?;
        // SAFETY: signalling the child this struct started (and has not
        // reaped, so the PID is still its own), by its PID.
        if unsafe { libc::kill(child.id() as i32, libc::SIGHUP) } != 0 {
            bail!("SIGHUP to sluice: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILL, as in a crash: the agent gets no chance to clean up.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        // SAFETY: signalling the child this struct started, by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("sluice did not exit within 5 s of SIGTERM")
    }
}

/// `sluice run --config CONFIG --listen LISTEN EXTRA…` inside `ns`, through
/// `wrapper` if not empty: a command that ends by running its arguments
/// (e.g. `setpriv … --`), for running the agent restricted.
pub fn agent_command(
    ns: &Netns,
    wrapper: &[&str],
    config: &Path,
    listen: SocketAddr,
    extra: &[&str],
) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &ns.name])
        .args(wrapper)
        .arg(sluice_bin())
        .args(["run", "--config"])
        .arg(config)
        .args(["--listen", &listen.to_string()])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    // The control socket and the overrides beside the test's config (its
    // own directory), not the host's /run/sluice and /var/lib/sluice.
    command
        .env("SLUICE_CONTROL_SOCKET", control_socket_of(config))
        .env("SLUICE_STATE_DIR", state_dir_of(config));
    command
}

/// The control socket of an agent `agent_command` started on `config`: in
/// a `run` directory beside it (as /run/sluice is in the DaemonSet).
pub fn control_socket_of(config: &Path) -> PathBuf {
    config
        .parent()
        .unwrap_or(Path::new("/tmp"))
        .join("run")
        .join("sluice.sock")
}

/// The state directory (runtime overrides) of such an agent.
pub fn state_dir_of(config: &Path) -> PathBuf {
    config.parent().unwrap_or(Path::new("/tmp")).join("state")
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// GET over HTTP/1.0 from inside `ns`: (status, body).
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    ns.enter(|| -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })?
}

/// The value of one sample in Prometheus text, e.g.
/// `metric(text, "sluice_backend_connections_total", &[("backend", "10.1.0.2:8080")])`.
/// Sums every series of the metric whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (metric_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

/// A server-first server in `ns` on `addr`: on each connection it sends
/// "push" every `period`, on its own, until the connection or `stop` ends
/// (the client never speaks). Its threads end with `stop`.
pub fn start_push_server(
    ns: &Netns,
    addr: SocketAddr,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let listener = ns
        .enter(move || std::net::TcpListener::bind(addr))?
        .with_context(|| format!("binding tcp {addr}"))?;
    listener.set_nonblocking(true)?;
    thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let stop = stop.clone();
                    thread::spawn(move || {
                        while !stop.load(Ordering::SeqCst) && stream.write_all(b"push\n").is_ok() {
                            thread::sleep(period);
                        }
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    Ok(())
}

/// A server process (dnsmasq, etcd…) started by a test inside a namespace.
/// Dropping it kills that process, by its PID, and nothing else.
pub struct Daemon {
    child: Option<Child>,
    pub what: String,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(ns: &Netns, program: &str, args: &[String], log: PathBuf) -> Result<Self> {
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        Ok(Self {
            child: Some(child),
            what: program.to_string(),
            log,
        })
    }

    /// Sends `signal` (e.g. SIGHUP: dnsmasq reloads its hosts files) to the
    /// process this started, by its PID.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .with_context(|| format!("{} was already stopped", self.what))?;
        // SAFETY: signalling the child this struct started (and has not
        // reaped, so the PID is still its own), by its PID.
        if unsafe { libc::kill(child.id() as i32, signal) } != 0 {
            bail!(
                "signal {signal} to {}: {}",
                self.what,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGKILL: the server dies without a goodbye, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's PID while it runs (`ip netns exec` execs the program,
    /// so this is the server itself): for pinning it and reading its CPU.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `interfaces:` section for the test topology: `front` and
/// `back0`..`back{backends-1}`, in the agent's default attach mode (auto).
pub fn interfaces_yaml(backends: usize) -> String {
    interfaces_yaml_in(backends, None)
}

/// As `interfaces_yaml`, each interface in `attach` mode if given.
pub fn interfaces_yaml_in(backends: usize, attach: Option<&str>) -> String {
    let mut text = String::from("interfaces:\n");
    for name in
        std::iter::once("front".to_string()).chain((0..backends).map(|i| format!("back{i}")))
    {
        text += &format!("  - name: {name}\n");
        if let Some(mode) = attach {
            text += &format!("    attach: {mode}\n");
        }
    }
    text
}

/// A config for the test topology with `lb_interfaces` interfaces and one
/// TCP service on the family's VIP, port 80, with one backend at `backend`,
/// dnat or (with `snat`) snat from the family's SNAT address.
pub fn one_service_yaml(
    lb_interfaces: usize,
    family: testbed::Family,
    snat: bool,
    backend: SocketAddr,
) -> String {
    one_service_yaml_with(&OneService {
        lb_interfaces,
        family,
        snat,
        backend,
        ..OneService::default()
    })
}

/// What `one_service_yaml_with` writes: `one_service_yaml`'s arguments, and
/// the settings it leaves at their defaults.
#[derive(Clone, Debug)]
pub struct OneService<'a> {
    pub lb_interfaces: usize,
    pub family: testbed::Family,
    pub snat: bool,
    pub backend: SocketAddr,
    /// Every interface's attach mode (None: the agent's default, auto).
    pub attach: Option<&'a str>,
    /// The service's port on the VIP.
    pub port: u16,
}

impl Default for OneService<'_> {
    fn default() -> Self {
        Self {
            lb_interfaces: 1,
            family: testbed::Family::V4,
            snat: false,
            backend: SocketAddr::new(testbed::Family::V4.backend(0), 8080),
            attach: None,
            port: 80,
        }
    }
}

/// The config `s` describes (see `one_service_yaml`).
pub fn one_service_yaml_with(s: &OneService) -> String {
    let (family, snat, backend) = (s.family, s.snat, s.backend);
    let mut text = interfaces_yaml_in(s.lb_interfaces, s.attach);
    text += &format!(
        "services:\n  - name: web\n    vip: \"{}\"\n    port: {}\n    protocol: tcp\n",
        family.vip(),
        s.port
    );
    if snat {
        text += &format!("    forwarding: snat\n    snat_ip: \"{}\"\n", family.snat());
    }
    text + &format!("    backends:\n      - address: \"{backend}\"\n")
}

/// Sets its flag when dropped: the stop signal of threads a test started,
/// given on every way out of the test, failures included.
pub struct StopOnDrop(pub Arc<AtomicBool>);

impl StopOnDrop {
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }

    /// The flag, for a thread to watch.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Sets the flag now.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Default for StopOnDrop {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `f` every 100 ms until it says true; fails after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `/api/v1/services` parsed.
pub fn services_json(ns: &Netns, agent: &Agent) -> Result<serde_json::Value> {
    let (status, body) = http_get(ns, agent.listen, "/api/v1/services")?;
    if status != 200 {
        bail!("/api/v1/services: HTTP {status}: {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// One service's entry of `/api/v1/services`.
pub fn service_json(ns: &Netns, agent: &Agent, service: &str) -> Result<serde_json::Value> {
    let all = services_json(ns, agent)?;
    all["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == service)
        .cloned()
        .with_context(|| format!("service {service} not in /api/v1/services: {all}"))
}

/// A service's backends as the API lists them: address → state.
pub fn backend_states(
    ns: &Netns,
    agent: &Agent,
    service: &str,
) -> Result<std::collections::BTreeMap<String, String>> {
    let s = service_json(ns, agent, service)?;
    Ok(s["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or("").to_string(),
                b["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

/// A bpffs instance mounted for one test (in the root mount namespace, so
/// every `ip netns exec` sees it). Unmounted on drop, which drops its pins.
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    /// A bpffs of the test's own, mounted without options: its root is
    /// writable by every user, with the sticky bit (the kernel's default).
    pub fn mount(dir: &TempDir) -> Result<Self> {
        Self::mount_with(dir, &[])
    }

    /// As `mount`, with `mount -o` options (e.g. `mode=0700`).
    pub fn mount_with(dir: &TempDir, options: &[&str]) -> Result<Self> {
        let path = dir.path("bpffs");
        std::fs::create_dir_all(&path)?;
        let mut mount = Command::new("mount");
        mount.args(["-t", "bpf"]);
        if !options.is_empty() {
            mount.args(["-o", &options.join(",")]);
        }
        let status = mount.arg("bpf").arg(&path).status()?;
        if !status.success() {
            bail!("mount -t bpf {options:?} bpf {} failed", path.display());
        }
        Ok(Self(path))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A cgroup v2 made for one test, on a cgroup2 mount of its own outside
/// /sys (which `ip netns exec` remounts). Removed on drop.
pub struct Cgroup {
    pub mount: PathBuf,
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(dir: &TempDir, name: &str) -> Result<Self> {
        let mount = dir.path("cgroup2");
        std::fs::create_dir_all(&mount)?;
        let ok = Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&mount)
            .status()?
            .success();
        if !ok {
            bail!("mount -t cgroup2 failed");
        }
        let path = mount.join(testbed::unique(name));
        std::fs::create_dir(&path)?;
        Ok(Self { mount, path })
    }

    /// Runs the Python `script` in network namespace `netns`, as a process
    /// of this cgroup (so the socket-level hooks see its sockets), and
    /// returns one JSON object per line it prints.
    pub fn run_python(&self, netns: &str, script: &str) -> Result<Vec<serde_json::Value>> {
        let procs = self.path.join("cgroup.procs");
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "sh", "-c"])
            .arg(format!(
                "echo $$ > {} && exec python3 -c \"$0\"",
                procs.display()
            ))
            .arg(script)
            .stdin(std::process::Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "client failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("client line {l:?}")))
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The test's client processes have exited: the cgroup is empty.
        let _ = std::fs::remove_dir(&self.path);
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// The backends (by the name their server answers with) that `n` new TCP
/// connections from the topology's client to `vip` reach.
pub fn backends_reached(
    topo: &testbed::Topology,
    vip: SocketAddr,
    n: usize,
) -> Result<std::collections::BTreeSet<String>> {
    topo.client
        .enter(|| -> Result<std::collections::BTreeSet<String>> {
            (0..n)
                .map(|i| {
                    Ok(testbed::tcp_ask(vip, Duration::from_secs(3))
                        .with_context(|| format!("connection {i} through {vip}"))?
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string())
                })
                .collect()
        })?
}

/// A test bed: the client ⇄ lb ⇄ backends topology with every backend
/// serving (IPv4, port 8080), warm neighbour tables, and a temporary
/// directory for configs and logs.
pub struct Bed {
    pub topo: testbed::Topology,
    pub servers: Vec<testbed::NameServer>,
    pub dir: TempDir,
}

impl Bed {
    pub fn new(tag: &str, backends: usize) -> Result<Self> {
        let topo = testbed::Topology::new(tag, backends)?;
        let servers = topo.serve(testbed::Family::V4, 8080)?;
        topo.warm_neighbours()?;
        let dir = TempDir::new(tag)?;
        Ok(Self { topo, servers, dir })
    }
}

/// A TCP socket bound to `local` (port 0: any) and connected to `target`.
/// A fixed port makes a known 5-tuple (address reuse lets a test make the
/// same tuple again after the last one closed).
fn tcp_connect_from(local: SocketAddr, target: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&local.into())?;
    socket
        .connect_timeout(&target.into(), timeout)
        .with_context(|| format!("connecting to {target} from {local}"))?;
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// `testbed::tcp_ask` from `local`: the whole reply of the backend's
/// name server.
pub fn tcp_ask_from(local: SocketAddr, target: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = tcp_connect_from(local, target, timeout)?;
    s.write_all(b"hello\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .with_context(|| format!("reading from {target}"))?;
    Ok(reply)
}

/// A connection from `local` to `target` that stays open: the name server
/// answers its name, then echoes every line. Returns the name and the
/// connection.
pub fn tcp_echo_from(
    local: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
) -> Result<(String, TcpStream)> {
    let mut s = tcp_connect_from(local, target, timeout)?;
    s.write_all(b"echo\n")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s.try_clone()?), &mut line)?;
    Ok((line.split_whitespace().next().unwrap_or("").to_string(), s))
}
