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
//!   two conntrack inserts; at steady state the LRU map also evicts).
//!
//! Every case's return code and the datapath's own counters are checked, so
//! the numbers are known to come from the intended path.

use agent_common::registry::program::XDP as XDP_PROGRAM;
use agent_common::{BenchFrame, ServiceStats};
use anyhow::{Context, Result, ensure};
use aya::{
    maps::{Array, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
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
}

fn parse_args() -> Result<Args> {
    let f = Flags::parse(&[("--repeat", "N"), ("--rounds", "N"), ("--only", "CASE")])?;
    let args = Args {
        repeat: f.get("--repeat", 1_000_000)?,
        rounds: f.get("--rounds", 5)?,
        only: f.text("--only"),
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
}

const CASES: [(Case, &str); 8] = [
    (Case::Empty, "empty XDP_PASS (baseline)"),
    (Case::NonVip, "sluice: non-VIP packet"),
    (Case::Restore, "restore wrapper → empty"),
    (Case::Established, "sluice: established flow"),
    (Case::RestoreVary, "restore+vary wrapper → empty"),
    (Case::NewFlow, "sluice: new flow"),
    (Case::EstablishedBare, "no stats/events: established"),
    (Case::NewFlowBare, "no stats/events: new flow"),
];

/// A datapath loaded for benchmarking: its bench programs loaded, the
/// restore wrapper's maps at hand.
struct BenchBed {
    bed: FibBed,
    jump: ProgramArray<aya::maps::MapData>,
    restore: Array<aya::maps::MapData, BenchFrame>,
    pass_fd: ProgramFd,
    sluice_fd: ProgramFd,
    established_made: bool,
}

impl BenchBed {
    fn new(object: Option<&[u8]>, conntrack: u32) -> Result<Self> {
        let mut bed = match object {
            Some(bytes) => FibBed::with_object(SERVICES, conntrack, bytes)?,
            None => FibBed::with_conntrack(SERVICES, conntrack)?,
        };
        let ebpf = bed.datapath.ebpf_mut();
        for name in ["bench_pass", "bench_restore"] {
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
        let jump = ebpf
            .take_map("BENCH_JUMP")
            .context("BENCH_JUMP")?
            .try_into()?;
        let restore = ebpf
            .take_map("BENCH_FRAME")
            .context("BENCH_FRAME")?
            .try_into()?;
        Ok(Self {
            bed,
            jump,
            restore,
            pass_fd,
            sluice_fd,
            established_made: false,
        })
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // New flows must find free conntrack entries (not evict): every new-flow
    // run adds two entries, so cap those runs to what the map holds.
    let conntrack: u32 = 262_144; // the agent's default
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
            let (program, data, to_sluice, vary) = match case {
                Case::Empty => ("bench_pass", &established, None, 0),
                Case::NonVip => (XDP_PROGRAM, &non_vip, None, 0),
                Case::Restore => ("bench_restore", &established, Some(false), 0),
                Case::Established | Case::EstablishedBare => {
                    ("bench_restore", &established, Some(true), 0)
                }
                Case::RestoreVary => ("bench_restore", &new_flow, Some(false), 1),
                Case::NewFlow | Case::NewFlowBare => ("bench_restore", &new_flow, Some(true), 1),
            };
            if let Some(to_sluice) = to_sluice {
                let fd = if to_sluice { &b.sluice_fd } else { &b.pass_fd };
                b.jump.set(0, fd, 0)?;
                b.restore.set(0, bench_frame(data, vary), 0)?;
            }
            if matches!(case, Case::Established | Case::EstablishedBare) && !b.established_made {
                // Create the flow once, so the timed runs find it.
                time(&mut b.bed, program, data, 1)?;
                b.established_made = true;
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
         conntrack map that never fills), interleaved; ns/packet (median, min–max)\n",
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
