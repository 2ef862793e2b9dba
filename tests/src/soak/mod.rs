//! The soak: the real agent in network namespaces, with real backends, for
//! minutes on end, under everything at once: mixed TCP (short and idle,
//! client-first and server-first, DNAT and SNAT, IPv4 and IPv6) and UDP
//! traffic; the config file rewritten every 20–30 s (backends added,
//! removed, reweighted); one service's backends from DNS, the records
//! changed under it; the agent killed with `kill -9` and started again
//! every 2–3 minutes over a pinned datapath; and one SYN flood in the
//! middle. It reports every failed connection and whether it fell in the
//! flood or a restart, and the agent's memory and the flow tables'
//! occupancy over time.
//!
//! One conductor (the calling thread) does the churn, the restarts, the
//! flood and the sampling in turn, so no two of them overlap; the clients
//! run on threads of their own.

mod bed;
pub mod report;
mod traffic;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use self::{
    bed::{BACKENDS, Bed, Churned, Expected, Targets},
    report::{Flood, Observed, Restart, Sample, Window, WindowKind},
    traffic::{Recorder, sleep_unless},
};
use crate::{Agent, StopOnDrop, http_get, metric, raw, service_json};
use anyhow::{Context, Result, bail};

/// What the soak does, and when.
#[derive(Clone, Debug)]
pub struct Options {
    pub duration: Duration,
    /// Samples before this are not compared (the tables fill up first).
    pub warm_up: Duration,
    pub sample_every: Duration,
    /// `kill -9` of the agent, and a new one, every (min, max) apart.
    /// None: never.
    pub restart_every: Option<(Duration, Duration)>,
    /// How long no agent runs between a kill and the next start.
    pub restart_down: Duration,
    /// A config change every (min, max).
    pub config_every: (Duration, Duration),
    /// A change of the DNS records every (min, max).
    pub dns_every: (Duration, Duration),
    /// The flood's start and length (zero length: no flood).
    pub flood_at: Duration,
    pub flood_for: Duration,
    /// Each short-traffic kind makes one connection (or UDP exchange) this
    /// often.
    pub short_every: Duration,
    /// Idle connections of each idle kind, and how often each is checked.
    pub idle_each: usize,
    pub idle_every: Duration,
    pub seed: u64,
    /// Progress lines on stderr (about once a minute, and at each event).
    pub progress: bool,
    /// Set (by a signal handler): end early, clean up, report.
    pub interrupt: Option<&'static AtomicBool>,
    /// Where the agents' and dnsmasq's logs are copied at the end.
    pub keep_logs: Option<PathBuf>,
}

impl Options {
    /// A soak of `minutes`: warm-up 30 s, a sample every 10 s, restarts
    /// every 2–3 min, config changes every 20–30 s, DNS changes every
    /// 15–25 s, a 10 s flood in the middle.
    pub fn for_minutes(minutes: f64) -> Self {
        let duration = Duration::from_secs_f64(minutes * 60.0);
        Self {
            duration,
            warm_up: Duration::from_secs(30),
            sample_every: Duration::from_secs(10),
            restart_every: Some((Duration::from_secs(120), Duration::from_secs(180))),
            restart_down: Duration::from_secs(1),
            config_every: (Duration::from_secs(20), Duration::from_secs(30)),
            dns_every: (Duration::from_secs(15), Duration::from_secs(25)),
            flood_at: duration / 2,
            flood_for: Duration::from_secs(10),
            short_every: Duration::from_millis(100),
            idle_each: 6,
            idle_every: Duration::from_secs(15),
            seed: 1,
            progress: true,
            interrupt: None,
            keep_logs: None,
        }
    }

    fn check(&self) -> Result<()> {
        for (name, d) in [
            ("duration", self.duration),
            ("sample_every", self.sample_every),
            ("config_every", self.config_every.0),
            ("dns_every", self.dns_every.0),
            ("short_every", self.short_every),
            ("idle_every", self.idle_every),
        ] {
            if d.is_zero() {
                bail!("soak option {name}: must be more than 0");
            }
        }
        if let Some((min, max)) = self.restart_every
            && (min.is_zero() || max < min)
        {
            bail!("soak option restart_every: ({min:?}, {max:?}) is not a range above 0");
        }
        if self.flood_at + self.flood_for > self.duration {
            bail!(
                "soak option flood_at + flood_for: {:?} ends after the soak ({:?})",
                self.flood_at + self.flood_for,
                self.duration
            );
        }
        Ok(())
    }
}

/// A small seeded generator (xorshift64*): the same seed, the same churn.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn between(&mut self, (min, max): (Duration, Duration)) -> Duration {
        let span = max.saturating_sub(min).as_millis() as u64;
        min + Duration::from_millis(if span == 0 { 0 } else { self.next() % span })
    }
}

/// How long a change may take to show in the agent's API: the file is
/// checked every second; DNS answers live 2 s and are asked again at once.
const APPLY_LIMIT: Duration = Duration::from_secs(15);
/// Failures this soon after a flood or a restart still count as theirs.
const WINDOW_GRACE: f64 = 3.0;
/// A new agent's first sweep counts the tables: samples wait that long.
const SAMPLE_AFTER_START: Duration = Duration::from_secs(5);

/// The agent running now, and which one it is.
struct Life {
    agent: Agent,
    n: usize,
    started: Instant,
}

/// Runs the soak; returns what it saw (`report::Observed::verdict` says
/// whether it passed). An error is a broken test bed, not a finding.
pub fn run(opts: &Options) -> Result<Observed> {
    opts.check()?;
    let mut rng = Rng(opts.seed.max(1) ^ 0x9e37_79b9_7f4a_7c15);
    let mut churned = Churned::initial();
    let mut dns_set: BTreeSet<usize> = [0, 1].into();
    let stop = StopOnDrop::new();
    let bed = Bed::new(&churned, &dns_set, stop.flag())?;
    let targets = Targets::new();
    let mut life = Life {
        agent: Agent::start(&bed.topo.lb, &bed.config, bed.dir.path("agent-1.log"))?,
        n: 1,
        started: Instant::now(),
    };
    // The bed works before the clock starts: every service as configured.
    wait_applied(&bed, &life.agent, "churn", &bed::expected_churn(&churned))?;
    wait_applied(&bed, &life.agent, "steady", &bed::expected_steady(&churned))?;
    wait_applied(&bed, &life.agent, "dns", &bed::expected_dns(&dns_set))?;

    let start = Instant::now();
    let recorder = Arc::new(Recorder::new(start));
    let mut threads = traffic::start_short(
        &bed.topo.client,
        &targets,
        opts.short_every,
        &recorder,
        &stop.0,
    )?;
    threads.push(traffic::start_idle(
        &bed.topo.client,
        &targets,
        opts.idle_each,
        opts.idle_every,
        &recorder,
        &stop.0,
    )?);
    let say = |what: &str| {
        if opts.progress {
            eprintln!("[{:6.1} s] {what}", start.elapsed().as_secs_f64());
        }
    };
    say(&format!(
        "soak started: {} backends, {:?}, seed {}",
        BACKENDS, opts.duration, opts.seed
    ));

    let mut seen = Observed {
        warm_up: opts.warm_up.as_secs_f64(),
        ..Observed::default()
    };
    let secs = |at: Instant| at.saturating_duration_since(start).as_secs_f64();
    let flood_guard = (
        opts.flood_at.saturating_sub(Duration::from_secs(10)),
        opts.flood_at + opts.flood_for + Duration::from_secs(10),
    );
    let next_restart = |rng: &mut Rng, after: Duration| -> Option<Duration> {
        let (min, max) = opts.restart_every?;
        let mut at = after + rng.between((min, max));
        // Never during the flood: each window is counted apart.
        if !opts.flood_for.is_zero() && at >= flood_guard.0 && at <= flood_guard.1 {
            at = flood_guard.1;
        }
        Some(at)
    };
    let mut restart_at = next_restart(&mut rng, Duration::ZERO);
    let mut config_at = rng.between(opts.config_every);
    let mut dns_at = rng.between(opts.dns_every);
    let mut sample_at = Duration::ZERO;
    let mut progress_at = Duration::from_secs(60);
    let mut flood: Option<Flooding> = None;
    let mut flood_done = opts.flood_for.is_zero();

    loop {
        let now = start.elapsed();
        if opts.interrupt.is_some_and(|i| i.load(Ordering::SeqCst)) {
            seen.interrupted = true;
            say("interrupted: cleaning up");
            break;
        }
        if now >= opts.duration {
            break;
        }
        if !flood_done && flood.is_none() && now >= opts.flood_at {
            say(&format!(
                "flood: SYNs from {} for {:?}",
                crate::flood::SOURCES,
                opts.flood_for
            ));
            flood = Some(Flooding::start(&bed, &targets, rng.next() as u32)?);
        }
        if flood.is_some() && now >= opts.flood_at + opts.flood_for {
            let mut flooding = flood.take().expect("flooding");
            let sent = flooding.finish()?;
            let ended = Instant::now();
            let mut f = Flood {
                from: secs(flooding.began),
                to: secs(ended),
                sent,
                ..Flood::default()
            };
            match http_get(&bed.topo.lb, life.agent.listen, "/metrics") {
                Ok((_, m)) => {
                    let v = |name| metric(&m, name, &[]).unwrap_or(0.0);
                    f.conntrack_after = v("sluice_conntrack_entries");
                    f.half_open_after = v("sluice_conntrack_half_open_entries");
                    f.over_budget = v("sluice_service_new_flows_over_budget_total");
                }
                Err(e) => seen
                    .problems
                    .push(format!("/metrics after the flood: {e:#}")),
            }
            say(&format!(
                "flood over: {sent} SYNs; half-open {:.0}, conntrack {:.0}",
                f.half_open_after, f.conntrack_after
            ));
            seen.windows.push(Window {
                kind: WindowKind::Flood,
                from: f.from,
                to: f.to + WINDOW_GRACE,
            });
            seen.flood = Some(f);
            flood_done = true;
        }
        if restart_at.is_some_and(|at| now >= at) && flood.is_none() {
            let killed = Instant::now();
            life.agent.kill9()?;
            thread::sleep(opts.restart_down);
            life = restart(&bed, life.n + 1)?;
            let ready = Instant::now();
            let log = life.agent.log_text();
            if !log.contains("adopted the pinned datapath") {
                seen.problems.push(format!(
                    "agent {} did not adopt the pinned datapath (see agent-{}.log)",
                    life.n, life.n
                ));
            }
            seen.restarts.push(Restart {
                killed_at: secs(killed),
                ready_at: secs(ready),
            });
            seen.windows.push(Window {
                kind: WindowKind::Restart,
                from: secs(killed),
                to: secs(ready) + WINDOW_GRACE,
            });
            say(&format!(
                "kill -9 of agent {}; agent {} ready {:.1} s later",
                life.n - 1,
                life.n,
                secs(ready) - secs(killed)
            ));
            restart_at = next_restart(&mut rng, start.elapsed());
        }
        if now >= config_at {
            let what = churn_config(&mut rng, &mut churned);
            bed::replace_file(&bed.config, &bed::config_yaml(&bed.pin_dir, &churned))?;
            seen.config_changes
                .push((secs(Instant::now()), what.clone()));
            for (service, want) in [
                ("churn", bed::expected_churn(&churned)),
                ("steady", bed::expected_steady(&churned)),
            ] {
                if let Err(e) = wait_applied(&bed, &life.agent, service, &want) {
                    seen.problems.push(format!("config change {what:?}: {e:#}"));
                }
            }
            config_at = start.elapsed() + rng.between(opts.config_every);
        }
        if now >= dns_at {
            let before = dns_set.clone();
            // Never empty: the agent would hold the last answer back (and
            // say so), and the soak's `dns` clients would have no backend.
            while dns_set == before || dns_set.is_empty() {
                dns_set = (0..BACKENDS).filter(|_| rng.below(2) == 1).collect();
            }
            let what = format!("{before:?} → {dns_set:?}");
            bed::replace_file(&bed.hosts, &bed::hosts_file(&dns_set))?;
            bed.dns.signal(libc::SIGHUP)?;
            seen.dns_changes.push((secs(Instant::now()), what.clone()));
            if let Err(e) = wait_applied(&bed, &life.agent, "dns", &bed::expected_dns(&dns_set)) {
                seen.problems.push(format!("DNS change {what}: {e:#}"));
            }
            dns_at = start.elapsed() + rng.between(opts.dns_every);
        }
        if now >= sample_at && life.started.elapsed() >= SAMPLE_AFTER_START {
            match take_sample(&bed, &life, secs(Instant::now())) {
                Ok(s) => seen.samples.push(s),
                Err(e) => seen
                    .problems
                    .push(format!("sample at {:.0} s: {e:#}", now.as_secs_f64())),
            }
            sample_at = now + opts.sample_every;
        }
        if now >= progress_at {
            let (attempts, failures) = recorder.snapshot();
            let s = seen.samples.last();
            say(&format!(
                "{} attempts, {} failed; agent {} RSS {} KiB, conntrack {:.0}, half-open {:.0}",
                attempts.values().sum::<u64>(),
                failures.len(),
                life.n,
                s.map_or(0, |s| s.rss_kib),
                s.map_or(0.0, |s| s.conntrack),
                s.map_or(0.0, |s| s.half_open),
            ));
            progress_at = now + Duration::from_secs(60);
        }
        sleep_unless(&stop.0, Duration::from_millis(200));
    }
    if let Some(mut flooding) = flood.take() {
        let _ = flooding.finish();
    }
    seen.seconds = start.elapsed().as_secs_f64();
    stop.stop();
    for t in threads {
        let _ = t.join();
    }
    let (attempts, failures) = recorder.snapshot();
    seen.attempts = attempts;
    seen.failures = failures;
    if let Some(dir) = &opts.keep_logs {
        keep_logs(&bed, dir)?;
    }
    drop(life);
    drop(bed);
    Ok(seen)
}

/// Starts the next agent (it adopts the pinned datapath).
fn restart(bed: &Bed, n: usize) -> Result<Life> {
    let agent = Agent::start(
        &bed.topo.lb,
        &bed.config,
        bed.dir.path(&format!("agent-{n}.log")),
    )
    .with_context(|| format!("starting agent {n} after kill -9"))?;
    Ok(Life {
        agent,
        n,
        started: Instant::now(),
    })
}

/// One config change: a backend of `churn` and `udp` added, removed or
/// reweighted (at least one always stays), and one steady backend
/// reweighted (never to 0). Returns what changed.
fn churn_config(rng: &mut Rng, c: &mut Churned) -> String {
    let absent: Vec<usize> = (0..BACKENDS).filter(|i| !c.churn.contains_key(i)).collect();
    let present: Vec<usize> = c.churn.keys().copied().collect();
    let mut what = match rng.below(3) {
        0 if !absent.is_empty() => {
            let i = absent[rng.below(absent.len())];
            c.churn.insert(i, 1);
            format!("churn: b{i} added")
        }
        1 if present.len() > 1 => {
            let i = present[rng.below(present.len())];
            c.churn.remove(&i);
            format!("churn: b{i} removed")
        }
        _ => {
            let i = present[rng.below(present.len())];
            let w = c.churn[&i];
            let new = 1 + (w + rng.below(2) as u32) % 3;
            c.churn.insert(i, new);
            format!("churn: b{i} weight {w} → {new}")
        }
    };
    let i = rng.below(BACKENDS);
    let w = c.steady_weights[i];
    let new = 1 + (w + rng.below(2) as u32) % 3;
    c.steady_weights[i] = new;
    what += &format!("; steady: b{i} weight {w} → {new}");
    what
}

/// Waits until the API lists exactly `want` as `service`'s active backends
/// (address, weight).
fn wait_applied(bed: &Bed, agent: &Agent, service: &str, want: &Expected) -> Result<()> {
    let deadline = Instant::now() + APPLY_LIMIT;
    let mut now_active = Expected::new();
    while Instant::now() < deadline {
        if let Ok(s) = service_json(&bed.topo.lb, agent, service) {
            now_active = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["state"] == "active")
                .map(|b| {
                    (
                        b["address"].as_str().unwrap_or("").to_string(),
                        b["weight"].as_u64().unwrap_or(0) as u32,
                    )
                })
                .collect();
            if &now_active == want {
                return Ok(());
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    bail!("service {service}: active backends {now_active:?}, not {want:?}, after {APPLY_LIMIT:?}")
}

/// The SYN flood running on a thread of its own.
struct Flooding {
    began: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl Flooding {
    /// Starts the flood from the client's side towards `churn`'s VIP.
    fn start(bed: &Bed, targets: &Targets, seed: u32) -> Result<Self> {
        let SocketAddr::V4(target) = targets.churn else {
            bail!("the flood's target {} is not IPv4", targets.churn);
        };
        let lb_mac = raw::mac_of(&bed.topo.lb, "front")?;
        let sender = raw::RawSender::open(&bed.topo.client, "eth0")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread =
            thread::spawn(move || crate::flood::syn_flood(&sender, lb_mac, target, seed, &flag));
        Ok(Self {
            began: Instant::now(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops it; returns how many SYNs it sent.
    fn finish(&mut self) -> Result<u64> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the flood thread panicked")),
            None => Ok(0),
        }
    }
}

impl Drop for Flooding {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The agent's RSS and descriptors (/proc) and the tables' occupancy
/// (/metrics).
fn take_sample(bed: &Bed, life: &Life, at: f64) -> Result<Sample> {
    let pid = life.agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("agent {} (pid {pid}) is gone", life.n))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("agent {} (pid {pid}) has no VmRSS: exited?", life.n))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let (status, m) = http_get(&bed.topo.lb, life.agent.listen, "/metrics")?;
    if status != 200 {
        bail!("/metrics: HTTP {status}");
    }
    let value =
        |name: &str| metric(&m, name, &[]).with_context(|| format!("/metrics has no {name}"));
    Ok(Sample {
        at,
        life: life.n,
        rss_kib,
        fds,
        conntrack: value("sluice_conntrack_entries")?,
        half_open: value("sluice_conntrack_half_open_entries")?,
    })
}

/// Copies the agents' and dnsmasq's logs and the last config into `dir`.
fn keep_logs(bed: &Bed, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for entry in std::fs::read_dir(&bed.dir.0)? {
        let path = entry?.path();
        let keep = path.extension().is_some_and(|e| e == "log" || e == "yaml");
        if keep && let Some(name) = path.file_name() {
            std::fs::copy(&path, dir.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}
