//! Least privilege: what the agent runs with, and what it refuses.
//!
//! - The pin directory: refused (exit 2, one line naming the directory, its
//!   owner and mode, and what to do) when it, a parent up to the bpffs
//!   mount, or a directory the agent keeps pins in is writable by others or
//!   owned by another user; accepted under a bpffs mounted without a mode
//!   (whose root is sticky), and made 0700.
//! - Where nothing is mounted at /sys/fs/bpf, the agent mounts bpffs there,
//!   mode 0700.
//! - The DaemonSet's sandbox, as a container runtime makes it: root's uid
//!   with exactly the capabilities the manifest grants (read from it), no
//!   new privileges, a read-only root filesystem and /proc/sys. The agent
//!   loads, attaches (tc, cgroup hooks, raw tracepoints), pins, serves and
//!   forwards; without any one of those capabilities it can't start.
//! - Under a read-only /proc/sys, a kernel setting a service needs and the
//!   node lacks refuses start-up, naming the setting, its value, the value
//!   needed and how to set it; once the node has it, the agent starts.

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use sluice_tests::{
    Agent, Bed, Bpffs, Cgroup, agent_command, control_socket_of, http_get, metric,
    one_service_yaml, state_dir_of, wait_for,
};
use testbed::{Family, Topology};

/// Where the agent listens in the LB namespace (as `Agent` starts it).
const LISTEN: &str = "127.0.0.1:9464";

fn vip() -> SocketAddr {
    SocketAddr::new(Family::V4.vip(), 80)
}

/// One IPv4 service through the bed's LB (dnat, or snat), pinned under
/// `pin_dir` if given.
fn config(pin_dir: Option<&Path>, snat: bool) -> String {
    let backend = SocketAddr::new(Family::V4.backend(0), 8080);
    let mut text = one_service_yaml(1, Family::V4, snat, backend);
    if let Some(dir) = pin_dir {
        text += &format!("pinning:\n  directory: {}\n", dir.display());
    }
    text
}

fn write_config(bed: &Bed, text: &str) -> Result<PathBuf> {
    let path = bed.dir.path("sluice.yaml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A connection through the VIP from the client reaches a backend.
fn forwards(topo: &Topology) -> Result<String> {
    topo.client
        .enter(|| testbed::tcp_ask(vip(), Duration::from_secs(3)))?
        .context("a connection through the VIP")
}

/// Runs the agent (through `wrapper`) expecting it not to start: its exit
/// status and its whole output. An agent still running after 30 s is
/// killed (by its PID) and the test fails.
fn run_to_exit(bed: &Bed, wrapper: &[&str], cfg: &Path, log: &str) -> Result<(i32, String)> {
    let log = bed.dir.path(log);
    let file = std::fs::File::create(&log)?;
    let mut child = agent_command(&bed.topo.lb, wrapper, cfg, LISTEN.parse()?, &[])
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("starting sluice")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => break Err(anyhow::anyhow!("still running after 30 s")),
            Err(e) => break Err(e.into()),
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the agent was not refused: {e}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    };
    Ok((status.code().unwrap_or(-1), std::fs::read_to_string(&log)?))
}

/// The refusal in `output`: its one `error:` line, which must be its last.
fn refusal(output: &str) -> Result<String> {
    let errors: Vec<&str> = output.lines().filter(|l| l.starts_with("error:")).collect();
    if errors.len() != 1 || output.lines().last() != errors.first().copied() {
        bail!("not one error line, last:\n{output}");
    }
    Ok(errors[0].to_string())
}

/// Runs the agent expecting a refusal: exit 2, and one error line holding
/// every part of `expected`. Returns the line.
fn expect_refused(
    bed: &Bed,
    wrapper: &[&str],
    cfg: &Path,
    what: &str,
    expected: &[&str],
) -> Result<String> {
    let (code, output) = run_to_exit(bed, wrapper, cfg, &format!("{what}.log"))?;
    assert_eq!(code, 2, "{what}: exit status {code}:\n{output}");
    let line = refusal(&output).with_context(|| what.to_string())?;
    for part in expected {
        assert!(
            line.contains(part),
            "{what}: the refusal doesn't say {part:?}:\n{line}"
        );
    }
    Ok(line)
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .mode()
        & 0o7777)
}

#[test]
fn pin_directories_others_could_write_are_refused() -> Result<()> {
    let bed = Bed::new("pv", 1)?;
    // Mounted without a mode: the root is 1777, as the kernel makes it.
    let bpffs = Bpffs::mount(&bed.dir)?;
    assert_eq!(mode(&bpffs.0)?, 0o1777);

    // A good one: the agent makes the directory, root's and 0700, and runs.
    let pin = bpffs.0.join("node");
    let cfg = write_config(&bed, &config(Some(&pin), false))?;
    let mut agent = Agent::start(&bed.topo.lb, &cfg, bed.dir.path("good.log"))?;
    forwards(&bed.topo)?;
    let layout = pin.join(format!("layout-{}", agent_common::MAP_LAYOUT));
    for dir in [pin.clone(), layout.clone(), layout.join("maps")] {
        assert_eq!(mode(&dir)?, 0o700, "{}", dir.display());
    }
    assert!(
        agent
            .log_text()
            .contains("the bpffs is writable by every user (sticky"),
        "no word of the world-writable bpffs root:\n{}",
        agent.log_text()
    );
    assert_eq!(agent.stop()?, Some(0));

    // Its maps directory opened up while no agent ran: the next refuses to
    // adopt what others could have swapped in.
    let maps = layout.join("maps");
    chmod(&maps, 0o777)?;
    let line = expect_refused(
        &bed,
        &[],
        &cfg,
        "maps-0777",
        &[
            &format!("pinning.directory {}:", pin.display()),
            &format!("{} is owned by uid 0 with mode 0777", maps.display()),
            "writable by every user",
            &format!("chmod 0700 {}", maps.display()),
        ],
    )?;
    println!("refused: {line}");
    chmod(&maps, 0o700)?;

    // A pin directory made writable by all: refused, nothing pinned there.
    let open = bpffs.0.join("open");
    std::fs::create_dir(&open)?;
    chmod(&open, 0o777)?;
    let cfg = write_config(&bed, &config(Some(&open), false))?;
    expect_refused(
        &bed,
        &[],
        &cfg,
        "pin-0777",
        &[
            &format!("{} is owned by uid 0 with mode 0777", open.display()),
            "writable by group 0, writable by every user",
            "others could replace the pinned datapath",
            &format!("chown root:root {0} && chmod 0700 {0}", open.display()),
        ],
    )?;
    assert_eq!(std::fs::read_dir(&open)?.count(), 0, "something was pinned");

    // One owned by another user, however private.
    let theirs = bpffs.0.join("theirs");
    std::fs::create_dir(&theirs)?;
    chmod(&theirs, 0o700)?;
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534))?;
    let cfg = write_config(&bed, &config(Some(&theirs), false))?;
    expect_refused(
        &bed,
        &[],
        &cfg,
        "pin-other-owner",
        &[&format!(
            "{} is owned by uid 65534 with mode 0700 (not root's but uid 65534's)",
            theirs.display()
        )],
    )?;

    // A parent below the mount that all can write, sticky or not: the
    // agent's own 0700 directory in it is refused all the same.
    let shared = bpffs.0.join("shared");
    std::fs::create_dir(&shared)?;
    chmod(&shared, 0o1777)?;
    let cfg = write_config(&bed, &config(Some(&shared.join("node")), false))?;
    expect_refused(
        &bed,
        &[],
        &cfg,
        "parent-1777",
        &[&format!(
            "{} is owned by uid 0 with mode 1777",
            shared.display()
        )],
    )?;

    // The mount's root writable by all without the sticky bit: anyone could
    // rename root's directories away and put their own in their place.
    chmod(&bpffs.0, 0o777)?;
    let cfg = write_config(&bed, &config(Some(&pin), false))?;
    let refused = expect_refused(
        &bed,
        &[],
        &cfg,
        "root-0777",
        &[
            &format!("{} is owned by uid 0 with mode 0777", bpffs.0.display()),
            "mount the bpffs with -o mode=0700",
        ],
    );
    chmod(&bpffs.0, 0o1777)?;
    refused?;

    // Put right, the pinned datapath is adopted again.
    let agent = Agent::start(&bed.topo.lb, &cfg, bed.dir.path("again.log"))?;
    assert!(agent.log_text().contains("adopted the pinned datapath"));
    forwards(&bed.topo)?;
    Ok(())
}

#[test]
fn the_agent_mounts_bpffs_private_to_root() -> Result<()> {
    let bed = Bed::new("pm", 1)?;
    // `ip netns exec` gives the agent a /sys of its own, with nothing at
    // /sys/fs/bpf: the agent mounts bpffs there, in its mount namespace
    // (gone, with the pins, when the agent is).
    let pin = PathBuf::from("/sys/fs/bpf").join(testbed::unique("sluice-pm-"));
    let cfg = write_config(&bed, &config(Some(&pin), false))?;
    let agent = Agent::start(&bed.topo.lb, &cfg, bed.dir.path("agent.log"))?;
    assert!(
        agent
            .log_text()
            .contains("mounting bpffs at /sys/fs/bpf (mode 0700)"),
        "{}",
        agent.log_text()
    );
    forwards(&bed.topo)?;

    // Seen through the agent's own root: root's alone.
    let root = PathBuf::from(format!("/proc/{}/root", agent.pid()));
    let mount = root.join("sys/fs/bpf");
    assert_eq!(mode(&mount)? & 0o777, 0o700, "{}", mount.display());
    assert_eq!(std::fs::metadata(&mount)?.uid(), 0);
    assert_eq!(mode(&root.join(pin.strip_prefix("/")?))?, 0o700);
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid()))?;
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "))
        .with_context(|| format!("no bpffs at /sys/fs/bpf:\n{mountinfo}"))?;
    for option in ["nosuid", "nodev", "noexec", "mode=700"] {
        assert!(
            line.contains(option),
            "bpffs mounted without {option}: {line}"
        );
    }
    Ok(())
}

/// The capabilities the shipped DaemonSet adds to the agent's container
/// (after dropping ALL), as `setpriv` names them: "+bpf", ...
fn daemonset_capabilities() -> Result<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml");
    let ds: DaemonSet = serde_saphyr::from_str(&std::fs::read_to_string(&path)?)?;
    let agent = ds
        .spec
        .and_then(|s| s.template.spec)
        .context("the DaemonSet's pod spec")?
        .containers
        .into_iter()
        .find(|c| c.name == "sluice")
        .context("the sluice container")?;
    let caps = agent
        .security_context
        .and_then(|s| s.capabilities)
        .context("the sluice container's capabilities")?;
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{caps:?}");
    Ok(caps
        .add
        .context("capabilities.add")?
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect())
}

/// A wrapper (see `agent_command`) that runs the agent as a container
/// runtime does the DaemonSet's: root's uid holding `caps` and nothing
/// else (bounding set, so also after exec), no_new_privs, the root
/// filesystem, /proc/sys and `read_only` (the DaemonSet's read-only
/// volumes) read-only. The mounts are made in a mount namespace of the
/// agent's own, never the host's.
fn pod_sandbox(caps: &[String], read_only: &[&Path], config: &Path) -> Vec<String> {
    let mut script = String::from("mount --bind -o ro /proc/sys /proc/sys && ");
    for path in read_only {
        script += &format!("mount --bind -o ro '{0}' '{0}' && ", path.display());
    }
    // The DaemonSet's writable volumes: the control socket's directory (an
    // emptyDir in memory) and the state directory (the node's).
    let (run, state) = (control_socket_of(config), state_dir_of(config));
    let run = run.parent().unwrap();
    script += &format!(
        "mkdir -p '{0}' '{1}' && mount -t tmpfs -o mode=0700,size=1m sluice-run '{0}' && mount --bind '{1}' '{1}' && ",
        run.display(),
        state.display()
    );
    script += &format!(
        "mount -o remount,bind,ro / && \
         exec setpriv --bounding-set=-all,{} --inh-caps=-all --no-new-privs -- \"$@\"",
        caps.join(",")
    );
    ["unshare", "--mount", "--propagation", "slave", "sh", "-c"]
        .into_iter()
        .map(String::from)
        .chain([script, "sh".to_string()])
        .collect()
}

/// The capability bits `caps` ("+bpf", ...) stand for.
fn capability_mask(caps: &[String]) -> Result<u64> {
    caps.iter().try_fold(0u64, |mask, cap| {
        let bit = match cap.as_str() {
            "+net_admin" => 12,
            "+perfmon" => 38,
            "+bpf" => 39,
            other => bail!("capability {other}: add its number here"),
        };
        Ok(mask | 1 << bit)
    })
}

/// A `Cap…:` or other hex/number field of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {name} in /proc/{pid}/status"))
}

#[test]
fn the_daemonsets_capabilities_alone_run_the_datapath() -> Result<()> {
    let caps = daemonset_capabilities()?;
    let bed = Bed::new("pc", 1)?;
    // As the init container mounts it on a node.
    let bpffs = Bpffs::mount_with(&bed.dir, &["mode=0700"])?;
    let cgroup = Cgroup::new(&bed.dir, "sluice-pc-")?;
    // A Kubernetes node forwards IPv4 (kubelet and the CNI need it); the
    // sandbox's /proc/sys is read-only, so the node's value is what counts.
    bed.topo
        .lb
        .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    let text = config(Some(&bpffs.0.join("node")), false)
        + &format!("socket_lb:\n  cgroup: {}\n", cgroup.path.display());
    let cfg = write_config(&bed, &text)?;

    // The host's cgroup root is a read-only volume in the DaemonSet.
    let sandbox = pod_sandbox(&caps, &[&cgroup.mount], &cfg);
    let wrapper: Vec<&str> = sandbox.iter().map(String::as_str).collect();
    let mut agent =
        Agent::start_wrapped(&bed.topo.lb, &wrapper, &cfg, bed.dir.path("agent.log"), &[])?;
    // The sandbox is real: exactly those capabilities, no way to more.
    let mask = format!("{:016x}", capability_mask(&caps)?);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(agent.pid(), set)?, mask, "{set}");
    }
    assert_eq!(status_field(agent.pid(), "NoNewPrivs")?, "1");
    let log = agent.log_text();
    for step in [
        "attached interface=\"front\" mode=tc",
        "attached interface=\"back0\" mode=tc",
        "socket-level balancing attached",
    ] {
        assert!(log.contains(step), "no {step:?}:\n{log}");
    }
    forwards(&bed.topo)?;
    let (code, metrics) = http_get(&bed.topo.lb, agent.listen, "/metrics")?;
    assert_eq!(code, 200);
    assert_eq!(metric(&metrics, "sluice_ready", &[]), Some(1.0));
    assert!(
        metric(
            &metrics,
            "sluice_service_connections_total",
            &[("service", "web")]
        )
        .is_some_and(|n| n >= 1.0),
        "the connection was not counted"
    );
    let pinned = bpffs
        .0
        .join(format!("node/layout-{}/links", agent_common::MAP_LAYOUT));
    assert!(std::fs::read_dir(&pinned)?.count() >= 2, "links not pinned");
    assert_eq!(agent.stop()?, Some(0));

    // Restarted in the same sandbox, it adopts what it pinned.
    let mut agent = Agent::start_wrapped(
        &bed.topo.lb,
        &wrapper,
        &cfg,
        bed.dir.path("restart.log"),
        &[],
    )?;
    assert!(agent.log_text().contains("adopted the pinned datapath"));
    forwards(&bed.topo)?;
    assert_eq!(agent.stop()?, Some(0));

    // None of them is spare: without any one, the agent can't start.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let sandbox = pod_sandbox(&fewer, &[&cgroup.mount], &cfg);
        let wrapper: Vec<&str> = sandbox.iter().map(String::as_str).collect();
        let what = format!("without-{}", missing.trim_start_matches('+'));
        let (code, output) = run_to_exit(&bed, &wrapper, &cfg, &format!("{what}.log"))?;
        assert_ne!(code, 0, "{what}: started:\n{output}");
        // The kernel's refusal (a verifier log may follow the line).
        let error = &output[output.find("error:").context("no error")?..];
        assert!(
            error.contains("Operation not permitted") || error.contains("Permission denied"),
            "{what}: {error}"
        );
        println!("{what}: {}", error.lines().next().unwrap_or(""));
    }
    Ok(())
}

#[test]
fn read_only_proc_sys_refuses_a_setting_it_lacks_and_names_it() -> Result<()> {
    let caps = daemonset_capabilities()?;
    let bed = Bed::new("ps", 1)?;
    let sandbox = pod_sandbox(&caps, &[], &bed.dir.path("sluice.yaml"));
    let wrapper: Vec<&str> = sandbox.iter().map(String::as_str).collect();
    let lb = &bed.topo.lb;
    // A node that doesn't forward and doesn't accept local sources (set
    // here, whatever the host's defaults a new namespace inherits).
    lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"])?;
    lb.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"])?;
    for conf in ["all", "front", "back0"] {
        lb.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{conf}.accept_local=0"),
        ])?;
    }

    // dnat needs forwarding on the interfaces.
    let cfg = write_config(&bed, &config(None, false))?;
    let line = expect_refused(
        &bed,
        &wrapper,
        &cfg,
        "forwarding",
        &[
            "kernel setting net.ipv4.conf.front.forwarding is 0, Sluice needs 1",
            "Read-only file system",
            "set net.ipv4.ip_forward=1 on the node (sysctl -w net.ipv4.ip_forward=1",
        ],
    )?;
    println!("refused: {line}");

    // The node forwards: the agent starts. IPv6 forwarding, off and out of
    // reach, is only a warning while no service is IPv6.
    lb.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    let mut agent = Agent::start_wrapped(lb, &wrapper, &cfg, bed.dir.path("dnat.log"), &[])?;
    let log = agent.log_text();
    assert!(
        log.contains("setting=\"net.ipv6.conf.all.forwarding\"")
            && log.contains("no configured service needs it yet"),
        "no warning about IPv6 forwarding:\n{log}"
    );
    assert!(!log.contains("kernel setting changed"), "{log}");
    forwards(&bed.topo)?;

    // A change to snat needs accept_local, which the node lacks: rejected
    // with the same words, and the dnat config keeps serving.
    let cfg = write_config(&bed, &config(None, true))?;
    agent.reload()?;
    wait_for("the snat change rejected", Duration::from_secs(10), || {
        Ok(agent.log_text().contains("config change rejected"))
    })?;
    let log = agent.log_text();
    let rejected = log
        .lines()
        .find(|l| l.contains("config change rejected"))
        .unwrap_or("");
    assert!(
        rejected.contains("net.ipv4.conf.front.accept_local is 0")
            && rejected.contains("net.ipv4.conf.all.accept_local=1"),
        "{rejected}"
    );
    forwards(&bed.topo)?;
    assert_eq!(agent.stop()?, Some(0));

    // snat needs accept_local: refused at start, then started once the
    // node has it (for all interfaces, which the kernel ORs with each one's).
    let line = expect_refused(
        &bed,
        &wrapper,
        &cfg,
        "accept-local",
        &[
            "kernel setting net.ipv4.conf.front.accept_local is 0, Sluice needs 1 (the snat slow path)",
            "set net.ipv4.conf.all.accept_local=1 on the node",
        ],
    )?;
    println!("refused: {line}");
    lb.exec(&["sysctl", "-qw", "net.ipv4.conf.all.accept_local=1"])?;
    let mut agent = Agent::start_wrapped(lb, &wrapper, &cfg, bed.dir.path("snat.log"), &[])?;
    forwards(&bed.topo)?;
    assert_eq!(agent.stop()?, Some(0));
    Ok(())
}
