//! The datapath fuzzer in CI (docs/fuzzing.md): generated and mutated
//! packets through the XDP and TC programs by BPF_PROG_TEST_RUN, every
//! output judged by the independent oracle. A fixed seed (the same packets
//! on every run) and a fresh one (printed: a failure names it for replay).

use anyhow::Result;
use sluice_tests::fuzz::{self, Options};

const PACKETS: u64 = 50_000;

/// Defects the fuzzer found that are not fixed yet (docs/fuzzing.md,
/// "Findings"): counted and printed, not failed. Remove an entry with its
/// fix.
const KNOWN: &[&str] = &[];

fn fuzz_with(seed: u64) -> Result<()> {
    let mut opts = Options::new(PACKETS, seed);
    opts.known = KNOWN.to_vec();
    let report = fuzz::run(&opts)?;
    println!("{report}");
    assert_eq!(report.sent, PACKETS);
    assert_eq!(
        report.failed(),
        0,
        "seed {seed}: outputs the oracle refused (see above)"
    );
    // The stream reached every kind of outcome: the oracle judged real
    // rewrites (both directions, both forwarding modes), drops and passes.
    for class in [
        "forwarded to a backend (dnat)",
        "forwarded to a backend (snat)",
        "forwarded reply to a client (dnat)",
        "forwarded reply to a client (snat)",
        "forwarded (XDP_TX)",
        "passed untouched",
        "dropped: truncated",
        "passed, ICMP error translated",
    ] {
        assert!(
            report.classes.keys().any(|c| c.starts_with(class)),
            "seed {seed}: no output of class {class:?}"
        );
    }
    assert!(report.verified > 0, "seed {seed}: no checksum verified");
    Ok(())
}

#[test]
fn fixed_seed() -> Result<()> {
    fuzz_with(0x5eed_0001)
}

#[test]
fn fresh_seed() -> Result<()> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    println!(
        "fuzzing with seed {seed} (replay: cargo xtask fuzz datapath --seed {seed} --count {PACKETS})"
    );
    fuzz_with(seed)
}
