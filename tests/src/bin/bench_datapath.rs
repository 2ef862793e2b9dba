//! `cargo xtask bench datapath`: ns/packet of the XDP program by
//! BPF_PROG_TEST_RUN, against an empty XDP_PASS program timed in the same run.
//!
//! Cases, interleaved round by round (A B C … A B C …):
//! - `empty`: `bench_pass`, the baseline;
//! - `non-VIP`: sluice_xdp on a packet for no service (it passes unchanged);
//! - `restore`: `bench_restore` → `bench_pass`, the cost of putting the
//!   original headers back before every run (subtracted below);
//! - `established`: `bench_restore` → sluice_xdp on one flow that exists;
//! - `restore+vary`, `new flow`: the same with a counter written into the
//!   client's port and address, so every run is a new flow (Maglev choice,
//!   two half-open inserts, into a table sized so that it never evicts).
//!
//! - `live: redirect only`, `live: sluice, established`: the forwarding
//!   ceiling. Live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`): every run's frame
//!   really leaves by `t0` (its peer `t1` runs `bench_drop`, which counts
//!   it), the cost of sending included. Both go through `bench_restore`,
//!   since the kernel recycles a sent frame's page without copying the input
//!   into it again; the ceiling is a program that only redirects to the
//!   device Sluice sends this flow to. Reported as Mpps and as a ratio.
//!
//! Every case's return code and the datapath's own counters are checked, so
//! the numbers are known to come from the intended path.

use agent_common::registry::program::XDP as XDP_PROGRAM;
use agent_common::{BenchFrame, ServiceStats};
use anyhow::{Context, Result, ensure};
use aya::{
    maps::{Array, PerCpuArray, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use sluice_tests::{
    bench::{self, Flags},
    fib::{FibBed, XDP_PASS, XDP_REDIRECT},
    packet::{Pkt, TCP_ACK, TCP_SYN},
};
use testbed::Family;

/// The new-flow budget as good as unlimited (still taken from, so its
/// cost is measured): a benchmark creates flows far faster than clients.
const SERVICES: &str = "limits:
  new_flows_per_second: 4000000000
services:
  - name: bench
    vip: 10.100.0.1
    port: 80
    protocol: tcp
    backends:
      - address: 10.1.0.2:8080
      - address: 10.1.1.2:8080
      - address: 10.1.2.2:8080
";

struct Args {
    repeat: u32,
    rounds: usize,
    /// Run only the case whose name contains this (for profiling).
    only: Option<String>,
    /// Entries of the conntrack and half-open tables (the agent's default
    /// conntrack size unless given): how far apart new flows' entries lie
    /// in memory, so how many of their accesses miss the caches.
    conntrack: u32,
}

fn parse_args() -> Result<Args> {
    let f = Flags::parse(&[
        ("--repeat", "N"),
        ("--rounds", "N"),
        ("--only", "CASE"),
        ("--conntrack", "ENTRIES"),
    ])?;
    let args = Args {
        repeat: f.get("--repeat", 1_000_000)?,
        rounds: f.get("--rounds", 5)?,
        only: f.text("--only"),
        conntrack: f.get("--conntrack", 262_144)?, // the agent's default
    };
    ensure!(
        args.rounds >= 1 && args.repeat >= 1,
        "rounds and repeat must be positive"
    );
    Ok(args)
}

/// A frame padded to at least 64 bytes (what bench_restore rewrites).
fn frame(p: &Pkt) -> Vec<u8> {
    let mut p = p.clone();
    while p.bytes().len() < 64 {
        p.payload.push(b'.');
    }
    p.bytes()
}

fn bench_frame(bytes: &[u8], vary: u32) -> BenchFrame {
    let mut words = [0u64; 8];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
    }
    BenchFrame {
        words,
        vary,
        _pad: 0,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Empty,
    NonVip,
    Restore,
    Established,
    RestoreVary,
    NewFlow,
    /// The same two, on the build with statistics and events compiled out.
    EstablishedBare,
    NewFlowBare,
    /// Live frames: `bench_restore` → `bench_redirect` (to `t0`).
    LiveCeiling,
    /// Live frames: `bench_restore` → sluice_xdp, established flow.
    LiveSluice,
}

const CASES: [(Case, &str); 10] = [
    (Case::Empty, "empty XDP_PASS (baseline)"),
    (Case::NonVip, "sluice: non-VIP packet"),
    (Case::Restore, "restore wrapper → empty"),
    (Case::Established, "sluice: established flow"),
    (Case::RestoreVary, "restore+vary wrapper → empty"),
    (Case::NewFlow, "sluice: new flow"),
    (Case::EstablishedBare, "no stats/events: established"),
    (Case::NewFlowBare, "no stats/events: new flow"),
    (Case::LiveCeiling, "live: redirect only (ceiling)"),
    (Case::LiveSluice, "live: sluice, established"),
];

/// A datapath loaded for benchmarking: its bench programs loaded, the
/// restore wrapper's maps at hand.
struct BenchBed {
    bed: FibBed,
    jump: ProgramArray<aya::maps::MapData>,
    restore: Array<aya::maps::MapData, BenchFrame>,
    pass_fd: ProgramFd,
    sluice_fd: ProgramFd,
    redirect_fd: ProgramFd,
    delivered: PerCpuArray<aya::maps::MapData, u64>,
    /// The interface live frames arrive on: `t1` (the client side).
    ingress: u32,
    established_made: bool,
}

impl BenchBed {
    fn new(object: Option<&[u8]>, conntrack: u32) -> Result<Self> {
        // A SYN's two entries go into the half-open table (the bench never
        // completes the handshake): sized like conntrack, so that new flows
        // find free entries there too and the row times inserts, not evictions.
        let object = object.unwrap_or(sluice::datapath::EBPF_OBJECT);
        let mut bed = FibBed::with_tables(SERVICES, conntrack, conntrack, object)?;
        let ebpf = bed.datapath.ebpf_mut();
        for name in [
            "bench_pass",
            "bench_restore",
            "bench_redirect",
            "bench_drop",
        ] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        let fd_of = |ebpf: &mut aya::Ebpf, name: &str| -> Result<ProgramFd> {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .context(name.to_string())?
                .try_into()?;
            Ok(p.fd()?.try_clone()?)
        };
        let pass_fd = fd_of(ebpf, "bench_pass")?;
        let sluice_fd = fd_of(ebpf, XDP_PROGRAM)?;
        let redirect_fd = fd_of(ebpf, "bench_redirect")?;
        let jump = ebpf
            .take_map("BENCH_JUMP")
            .context("BENCH_JUMP")?
            .try_into()?;
        let restore = ebpf
            .take_map("BENCH_FRAME")
            .context("BENCH_FRAME")?
            .try_into()?;
        // Frames redirected into t0 arrive at t1, which must run an XDP
        // program to take them (a veth drops them otherwise).
        let (t0, t1) = bed.ns.enter(|| -> Result<(u32, u32)> {
            let drop: &mut Xdp = ebpf
                .program_mut("bench_drop")
                .context("program bench_drop")?
                .try_into()?;
            drop.attach("t1", XdpMode::Driver)
                .context("attaching bench_drop to t1")?;
            Ok((ifindex("t0")?, ifindex("t1")?))
        })??;
        let mut target: Array<aya::maps::MapData, u32> = ebpf
            .take_map("BENCH_TARGET")
            .context("BENCH_TARGET")?
            .try_into()?;
        target.set(0, t0, 0).context("BENCH_TARGET")?;
        let delivered = ebpf
            .take_map("BENCH_DELIVERED")
            .context("BENCH_DELIVERED")?
            .try_into()?;
        Ok(Self {
            bed,
            jump,
            restore,
            pass_fd,
            sluice_fd,
            redirect_fd,
            delivered,
            ingress: t1,
            established_made: false,
        })
    }
}

impl BenchBed {
    /// Creates the flow of `frame` once (through the restore wrapper into
    /// sluice_xdp), so that timed runs find it established.
    fn make_established(&mut self, frame: &[u8]) -> Result<()> {
        if self.established_made {
            return Ok(());
        }
        self.jump.set(0, &self.sluice_fd, 0)?;
        self.restore.set(0, bench_frame(frame, 0), 0)?;
        time(&mut self.bed, "bench_restore", frame, 1)?;
        self.established_made = true;
        Ok(())
    }

    /// Frames `bench_drop` has received on `t1`, all CPUs.
    fn delivered(&self) -> Result<u64> {
        Ok(self.delivered.get(&0, 0)?.iter().sum())
    }
}

/// One live-frames case: `repeat` copies of the established flow's frame
/// sent through the restore wrapper into the program under test. Returns
/// ns per frame, the sending included.
fn live(b: &mut BenchBed, case: Case, name: &str, frame: &[u8], repeat: u32) -> Result<f64> {
    b.make_established(frame)?;
    let fd = if case == Case::LiveSluice {
        &b.sluice_fd
    } else {
        &b.redirect_fd
    };
    b.jump.set(0, fd, 0)?;
    b.restore.set(0, bench_frame(frame, 0), 0)?;
    let (before, delivered_before) = (stats(&b.bed), b.delivered()?);
    let ns = &b.bed.ns;
    let prog: &mut Xdp = b
        .bed
        .datapath
        .ebpf_mut()
        .program_mut("bench_restore")
        .context("program bench_restore")?
        .try_into()?;
    let ctx = xdp_md(b.ingress, frame.len())?;
    let ctx = &ctx;
    let result = ns
        .enter(|| {
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(ctx),
                repeat,
                // The kernel's default batch (64 frames, as a NAPI poll).
                attrs: TestRunAttrs::new().xdp_live_frames(0),
                ..TestRunOptions::default()
            })
        })?
        .with_context(|| format!("{name}: live-frames test run"))?;
    let (after, delivered) = (stats(&b.bed), b.delivered()? - delivered_before);
    let (runs, packets, new_conns) = (
        u64::from(repeat),
        after.packets_to_backend - before.packets_to_backend,
        after.connections - before.connections,
    );
    // Every frame must have left by t0 and, for Sluice, on the established
    // path (its counters), not any other.
    ensure!(
        delivered == runs,
        "{name}: {delivered} of {runs} frames arrived at t1"
    );
    let want_packets = if case == Case::LiveSluice { runs } else { 0 };
    ensure!(
        packets == want_packets && new_conns == 0,
        "{name}: {packets} packets forwarded and {new_conns} new connections for {runs} frames: \
         not the established path"
    );
    Ok(result.duration.as_secs_f64() * 1e9)
}

/// The interface `name`'s index in the current network namespace.
fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(index != 0, "no interface {name}");
    Ok(index)
}

/// A `struct xdp_md` as BPF_PROG_TEST_RUN takes it: the frame from 0 to
/// `len` (the kernel checks `data_end` against the frame's length), no
/// metadata, ingress `ifindex`, receive queue 0. Live frames need a real
/// ingress device: they are sent as if received on its queue.
fn xdp_md(ingress: u32, len: usize) -> Result<Vec<u8>> {
    let len = u32::try_from(len).context("frame length")?;
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    Ok([0u32, len, 0, ingress, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // New flows must find free entries (not evict): every new-flow run adds
    // two half-open entries, so cap those runs to what the map holds.
    let conntrack = args.conntrack;
    let new_flow_repeat = args.repeat.min(conntrack / 2 / (args.rounds as u32 + 1));
    let mut full = BenchBed::new(None, conntrack)?;
    // The build without statistics and events, made by `cargo xtask bench`.
    let bare_object = std::env::var_os("SLUICE_BENCH_BARE_OBJECT")
        .map(std::fs::read)
        .transpose()
        .context("reading SLUICE_BENCH_BARE_OBJECT")?;
    let mut bare = match &bare_object {
        Some(bytes) => Some(BenchBed::new(Some(bytes), conntrack)?),
        None => None,
    };
    let fam = Family::V4;

    let established = Pkt::tcp(fam.client(), 40_000, fam.vip(), 80, TCP_ACK);
    let new_flow = Pkt::tcp(fam.client(), 40_001, fam.vip(), 80, TCP_SYN);
    let non_vip = Pkt::tcp(fam.client(), 40_000, "10.100.0.9".parse()?, 80, TCP_ACK);
    let (established, new_flow, non_vip) = (frame(&established), frame(&new_flow), frame(&non_vip));

    let mut results: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    for _round in 0..args.rounds {
        for (i, (case, name)) in CASES.iter().enumerate() {
            let is_bare = matches!(case, Case::EstablishedBare | Case::NewFlowBare);
            if args
                .only
                .as_ref()
                .is_some_and(|only| !name.contains(only.as_str()))
                || (is_bare && bare.is_none())
            {
                results[i].push(f64::NAN);
                continue;
            }
            let b: &mut BenchBed = if is_bare {
                bare.as_mut().expect("checked above")
            } else {
                &mut full
            };
            if matches!(case, Case::LiveCeiling | Case::LiveSluice) {
                results[i].push(live(b, *case, name, &established, args.repeat)?);
                continue;
            }
            let (program, data, to_sluice, vary) = match case {
                Case::Empty => ("bench_pass", &established, None, 0),
                Case::NonVip => (XDP_PROGRAM, &non_vip, None, 0),
                Case::Restore => ("bench_restore", &established, Some(false), 0),
                Case::Established | Case::EstablishedBare => {
                    ("bench_restore", &established, Some(true), 0)
                }
                Case::RestoreVary => ("bench_restore", &new_flow, Some(false), 1),
                Case::NewFlow | Case::NewFlowBare => ("bench_restore", &new_flow, Some(true), 1),
                Case::LiveCeiling | Case::LiveSluice => unreachable!("handled above"),
            };
            if let Some(to_sluice) = to_sluice {
                let fd = if to_sluice { &b.sluice_fd } else { &b.pass_fd };
                b.jump.set(0, fd, 0)?;
                b.restore.set(0, bench_frame(data, vary), 0)?;
            }
            if matches!(case, Case::Established | Case::EstablishedBare) {
                b.make_established(data)?;
            }
            let bed = &mut b.bed;
            let repeat = if matches!(case, Case::NewFlow | Case::RestoreVary | Case::NewFlowBare) {
                new_flow_repeat
            } else {
                args.repeat
            };
            let before = stats(bed);
            let (rc, per_packet) = time(bed, program, data, repeat)?;
            let after = stats(bed);
            let want_rc = match case {
                Case::Empty | Case::NonVip | Case::Restore | Case::RestoreVary => XDP_PASS,
                _ => XDP_REDIRECT,
            };
            ensure!(
                rc == want_rc,
                "{name}: return code {rc}, expected {want_rc}"
            );
            let runs = u64::from(repeat);
            let (new_conns, packets) = (
                after.connections - before.connections,
                after.packets_to_backend - before.packets_to_backend,
            );
            match case {
                Case::Established => ensure!(
                    new_conns == 0 && packets == runs,
                    "{name}: {packets} packets, {new_conns} new connections: not the established path"
                ),
                Case::NewFlow => ensure!(
                    new_conns == runs,
                    "{name}: {new_conns} new connections for {runs} runs: not the new-flow path"
                ),
                // Nothing counts in this build: the return code must do.
                Case::EstablishedBare | Case::NewFlowBare => {}
                _ => ensure!(packets == 0, "{name}: forwarded {packets} packets"),
            }
            results[i].push(per_packet);
        }
    }

    println!(
        "\nBPF_PROG_TEST_RUN, {} rounds × {} runs ({} for new flows, into a {}-entry \
         half-open table that never fills), interleaved; ns/packet (median, min–max)\n",
        args.rounds, args.repeat, new_flow_repeat, conntrack
    );
    println!("{:<32} {:>8} {:>17}", "case", "median", "min–max");
    for (i, (_, name)) in CASES.iter().enumerate() {
        let (median, lo, hi) = bench::stats(&results[i]);
        println!("{name:<32} {median:>8.1} {lo:>8.1}–{hi:<8.1}");
    }
    // Per-round differences: the cost Sluice adds over the empty program.
    let diff = |a: usize, b: usize| -> Vec<f64> {
        results[a]
            .iter()
            .zip(&results[b])
            .map(|(x, y)| x - y)
            .collect()
    };
    let ratio =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let base = &results[0];
    let mut rows = vec![
        ("non-VIP", diff(1, 0), 15.0),
        ("established flow", diff(3, 2), 60.0),
        ("new flow", diff(5, 4), 250.0),
    ];
    if bare.is_some() {
        rows.push(("stats+events, estab.", diff(3, 6), 10.0));
        rows.push(("stats+events, new", diff(5, 7), 10.0));
    }
    println!(
        "\n{:<20} {:>10} {:>19} {:>10} {:>8}   verdict",
        "Sluice over empty", "+ns median", "min–max", "× empty", "target"
    );
    for (k, (name, d, target)) in rows.into_iter().enumerate() {
        let (m, lo, hi) = bench::stats(&d);
        // The ratio to the empty program means something for Sluice's own
        // cases, not for a difference between two builds.
        let times = if k < 3 {
            let totals: Vec<f64> = d.iter().zip(base).map(|(d, b)| d + b).collect();
            format!("{:>9.2}×", bench::stats(&ratio(&totals, base)).0)
        } else {
            format!("{:>10}", "—")
        };
        println!(
            "{name:<20} {m:>+10.1} {lo:>+8.1}–{hi:<+9.1} {times} {target:>+7.0}   {}",
            if m <= target { "within" } else { "OVER" }
        );
    }
    println!(
        "\n(established/new flow: wrapper→sluice minus wrapper→empty, same round; \
         × empty: total time of the Sluice case over the empty program; \
         stats+events: the full build minus the build without them, same round)"
    );
    // Live frames: packets per second, each round's Sluice rate over the
    // ceiling's rate in the same round.
    let (ceiling, sluice) = (&results[8], &results[9]);
    if ceiling.iter().any(|x| !x.is_nan()) && sluice.iter().any(|x| !x.is_nan()) {
        let mpps = |v: &[f64]| -> Vec<f64> { v.iter().map(|ns| 1e3 / ns).collect() };
        let (c, sl) = (mpps(ceiling), mpps(sluice));
        println!(
            "\nLive frames (BPF_F_TEST_XDP_LIVE_FRAMES, 64-byte frames sent by t0 to a peer \
             that drops them), {} frames a round",
            args.repeat
        );
        println!("{:<32} {:>8} {:>17}", "case", "Mpps", "min–max");
        for (name, v) in [
            ("redirect only (ceiling)", &c),
            ("sluice, established", &sl),
        ] {
            let (m, lo, hi) = bench::stats(v);
            println!("{name:<32} {m:>8.2} {lo:>8.2}–{hi:<8.2}");
        }
        let (m, lo, hi) = bench::stats(&ratio(&sl, &c));
        println!(
            "{:<32} {m:>7.2}× {lo:>7.2}–{hi:<7.2}  target ≥ 0.80×   {}",
            "sluice / ceiling",
            if m >= 0.8 { "within" } else { "UNDER" }
        );
    }
    Ok(())
}

fn stats(bed: &FibBed) -> ServiceStats {
    let svc = bed.reconciler.services.get("bench").expect("bench service");
    bed.reconciler.stats(true, svc.id)
}

fn time(bed: &mut FibBed, program: &str, data: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let ns = &bed.ns;
    let prog: &mut Xdp = bed
        .datapath
        .ebpf_mut()
        .program_mut(program)
        .with_context(|| format!("program {program}"))?
        .try_into()?;
    let mut out = vec![0u8; data.len() + 64];
    let result = ns.enter(|| {
        prog.test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
    })??;
    // The kernel reports the mean time of one run.
    let per_packet = result.duration.as_secs_f64() * 1e9;
    Ok((result.return_value, per_packet))
}
