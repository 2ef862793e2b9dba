//! Fuzzing the datapath with an independent oracle: generated and mutated
//! packets through BPF_PROG_TEST_RUN (XDP and TC programs) against a
//! datapath configured with services, each output judged by `oracle`.
//! `cargo xtask fuzz datapath` runs it at length; tests/tests/fuzz.rs in CI.
//! See docs/fuzzing.md.

mod bed;
pub mod build;
pub mod generate;
pub mod oracle;
pub mod wire;
pub mod world;

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use self::{
    bed::Bed,
    generate::{Generator, Program},
    oracle::{Oracle, Verdict},
    world::{Side, World},
};

pub struct Options {
    pub count: u64,
    pub seed: u64,
    /// Share of packets through the TC program, in percent.
    pub tc_percent: u32,
    /// Another build of the kernel object (the built-in one if None).
    pub object: Option<Vec<u8>>,
    /// Failures kept in full (all are counted).
    pub keep_failures: usize,
    /// Print a progress line this often (packets; 0: never).
    pub progress_every: u64,
    /// Named defects (`oracle::finding`) already known: counted and shown,
    /// but not as failures.
    pub known: Vec<&'static str>,
}

impl Options {
    pub fn new(count: u64, seed: u64) -> Self {
        Self {
            count,
            seed,
            tc_percent: 25,
            object: None,
            keep_failures: 10,
            progress_every: 0,
            known: Vec::new(),
        }
    }
}

/// One output the oracle refused, with all it takes to replay it.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    /// The packet's position in the seed's stream (0-based).
    pub index: u64,
    pub program: Program,
    pub ingress: Side,
    pub kind: &'static str,
    pub verdict: Verdict,
    pub why: String,
    /// The named defect it shows (`oracle::finding`), if the oracle knows.
    pub finding: Option<&'static str>,
    pub input: Vec<u8>,
    pub output: Vec<u8>,
}

impl Failure {
    /// The failure without its addresses, ports and numbers: failures with
    /// one key are one finding.
    pub fn key(&self) -> String {
        if let Some(finding) = self.finding {
            return format!("[{finding}] {}", program_name(self.program));
        }
        let words: Vec<&str> = self
            .why
            .split_whitespace()
            .map(|w| {
                let hex = w.len() == 4 && w.chars().all(|c| c.is_ascii_hexdigit());
                if hex || w.chars().any(|c| c.is_ascii_digit()) {
                    "#"
                } else {
                    w
                }
            })
            .collect();
        format!(
            "{}/{}: {}",
            program_name(self.program),
            self.kind,
            words.join(" ")
        )
    }

    /// The command line that runs this one packet again on a fresh datapath.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo xtask fuzz datapath --replay {} --program {} --ingress {}",
            wire::hex(&self.input),
            program_name(self.program),
            side_name(self.ingress)
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let finding = self.finding.map(|f| format!("[{f}] ")).unwrap_or_default();
        writeln!(
            f,
            "{finding}seed {} packet #{} ({}, through {}, arriving on the {} side): {:?}: {}",
            self.seed,
            self.index,
            self.kind,
            program_name(self.program),
            side_name(self.ingress),
            self.verdict,
            self.why
        )?;
        writeln!(f, "  in:  {}", wire::hex(&self.input))?;
        writeln!(f, "  out: {}", wire::hex(&self.output))?;
        writeln!(
            f,
            "  the run again: cargo xtask fuzz datapath --seed {} --count {}",
            self.seed,
            self.index + 1
        )?;
        write!(f, "  this packet alone: {}", self.replay_command())
    }
}

pub fn program_name(p: Program) -> &'static str {
    match p {
        Program::Xdp => "xdp",
        Program::Tc => "tc",
    }
}

pub fn side_name(s: Side) -> &'static str {
    match s {
        Side::Backends => "backends",
        Side::Clients => "clients",
    }
}

pub fn parse_program(text: &str) -> Result<Program> {
    match text {
        "xdp" => Ok(Program::Xdp),
        "tc" => Ok(Program::Tc),
        other => anyhow::bail!("--program {other:?}: xdp or tc"),
    }
}

pub fn parse_side(text: &str) -> Result<Side> {
    match text {
        "clients" => Ok(Side::Clients),
        "backends" => Ok(Side::Backends),
        other => anyhow::bail!("--ingress {other:?}: clients or backends"),
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub sent: u64,
    pub elapsed: Duration,
    /// Outputs by the oracle's class.
    pub classes: BTreeMap<String, u64>,
    pub by_program: BTreeMap<String, u64>,
    /// Checksums verified from scratch on outputs of valid input; wrong
    /// input checksums kept wrong by the same amount.
    pub verified: u64,
    pub kept_wrong: u64,
    pub failures: Vec<Failure>,
    /// Every failure, by `Failure::key`.
    pub failure_kinds: BTreeMap<String, u64>,
    /// Refusals that show a known defect (`Options::known`): by finding,
    /// and the first example of each.
    pub known: BTreeMap<&'static str, u64>,
    pub known_examples: Vec<Failure>,
}

impl Report {
    pub fn failed(&self) -> u64 {
        self.failure_kinds.values().sum()
    }

    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {}: {} packets in {:.1} s ({:.0} packets/s), {} failed",
            self.seed,
            self.sent,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.failed()
        )?;
        for (program, n) in &self.by_program {
            writeln!(f, "  {program:<4} {n:>10}")?;
        }
        writeln!(f, "outputs by class:")?;
        let mut classes: Vec<_> = self.classes.iter().collect();
        classes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (class, n) in classes {
            writeln!(f, "  {n:>10}  {class}")?;
        }
        writeln!(
            f,
            "checksums: {} verified from scratch after a rewrite, {} wrong on input and \
             kept wrong by the same amount",
            self.verified, self.kept_wrong
        )?;
        if !self.known.is_empty() {
            writeln!(f, "known defects (refused, not counted as failures):")?;
            for (finding, n) in &self.known {
                writeln!(f, "  {n:>10}  {finding}")?;
            }
            for example in &self.known_examples {
                writeln!(f, "{example}")?;
            }
        }
        if !self.failure_kinds.is_empty() {
            writeln!(f, "failures by kind:")?;
            for (kind, n) in &self.failure_kinds {
                writeln!(f, "  {n:>10}  {kind}")?;
            }
            for failure in &self.failures {
                writeln!(f, "{failure}")?;
            }
        }
        Ok(())
    }
}

/// Sends `opts.count` packets of the seed's stream and judges each output.
pub fn run(opts: &Options) -> Result<Report> {
    let world = World::standard();
    let (ns, mut bed) = Bed::new(&world, opts.object.as_deref())?;
    ns.enter(|| run_inside(&mut bed, opts))?
}

fn run_inside(bed: &mut Bed, opts: &Options) -> Result<Report> {
    bed.attach()?;
    let mut generator = Generator::new(opts.seed, opts.tc_percent);
    let mut oracle = Oracle::new();
    let mut report = Report {
        seed: opts.seed,
        ..Report::default()
    };
    let started = Instant::now();
    for index in 0..opts.count {
        let mut input = generator.packet();
        if input.program == Program::Tc && !tc_runner_takes(&input.bytes) {
            input.program = Program::Xdp;
        }
        oracle.record(&input.bytes);
        let (verdict, out, counted) = bed
            .run(&input.bytes, input.program, input.ingress)
            .with_context(|| format!("packet #{index}: {}", wire::hex(&input.bytes)))?;
        *report
            .by_program
            .entry(program_name(input.program).to_string())
            .or_default() += 1;
        match oracle.judge(
            &input.bytes,
            input.ingress,
            input.program,
            verdict,
            &out,
            &counted,
        ) {
            Ok(j) => {
                *report.classes.entry(j.class).or_default() += 1;
                report.verified += u64::from(j.verified);
                report.kept_wrong += u64::from(j.kept_wrong);
                if let Some(flow) = j.flow {
                    generator.saw(flow);
                }
            }
            Err(refusal) => {
                let failure = Failure {
                    seed: opts.seed,
                    index,
                    program: input.program,
                    ingress: input.ingress,
                    kind: input.kind,
                    verdict,
                    why: refusal.why,
                    finding: refusal.finding,
                    input: input.bytes,
                    output: out,
                };
                if let Some(known) = failure.finding.filter(|f| opts.known.contains(f)) {
                    let count = report.known.entry(known).or_default();
                    *count += 1;
                    if *count == 1 {
                        report.known_examples.push(failure);
                    }
                } else {
                    let count = report.failure_kinds.entry(failure.key()).or_default();
                    *count += 1;
                    // The first of each kind, up to the limit.
                    if *count == 1 && report.failures.len() < opts.keep_failures {
                        report.failures.push(failure);
                    }
                }
            }
        }
        report.sent += 1;
        if opts.progress_every > 0 && report.sent.is_multiple_of(opts.progress_every) {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  {} packets, {:.0}/s, {} failed",
                report.sent,
                report.sent as f64 / secs,
                report.failed()
            );
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The kernel's test runner for TC programs refuses an IPv4 or IPv6 frame
/// shorter than its fixed IP header (the stack would not hand it to TC):
/// such frames go through XDP instead.
fn tc_runner_takes(frame: &[u8]) -> bool {
    match wire::be16(frame, 12) {
        Some(wire::ETHERTYPE_IPV4) => frame.len() >= wire::ETH_LEN + 20,
        Some(wire::ETHERTYPE_IPV6) => frame.len() >= wire::ETH_LEN + 40,
        _ => true,
    }
}

/// Runs `frames` in order on a fresh datapath and says what the oracle
/// thinks of each.
pub fn replay(frames: &[(Vec<u8>, Program, Side)], object: Option<&[u8]>) -> Result<Vec<String>> {
    let world = World::standard();
    let (ns, mut bed) = Bed::new(&world, object)?;
    ns.enter(|| -> Result<Vec<String>> {
        bed.attach()?;
        let mut oracle = Oracle::new();
        let mut lines = Vec::new();
        for (bytes, program, ingress) in frames {
            oracle.record(bytes);
            let (verdict, out, counted) = bed.run(bytes, *program, *ingress)?;
            let grown: Vec<String> = counted
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| format!("{} +{n}", agent_common::reason::ALL[c].name))
                .collect();
            let judged = match oracle.judge(bytes, *ingress, *program, verdict, &out, &counted) {
                Ok(j) => format!("ok: {}", j.class),
                Err(refusal) => format!(
                    "FAIL{}: {}",
                    refusal
                        .finding
                        .map(|f| format!(" [{f}]"))
                        .unwrap_or_default(),
                    refusal.why
                ),
            };
            lines.push(format!(
                "{:?}, counted [{}]\n  out: {}\n  {judged}",
                verdict,
                grown.join(", "),
                wire::hex(&out)
            ));
        }
        Ok(lines)
    })?
}
