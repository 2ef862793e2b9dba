//! `cargo xtask fuzz datapath`: generated and mutated packets through the
//! XDP and TC programs by BPF_PROG_TEST_RUN, each output judged by an
//! independent oracle (see docs/fuzzing.md).
//!
//! Options: `--count N` (default 1,000,000), `--seed S` (default: from the
//! clock, printed), `--tc-percent P` (default 25), `--object FILE` (another
//! build of the kernel object), `--show N` failures in full (default 10);
//! `--known FINDING,…` counts those named defects apart (not as failures);
//! `--replay HEX[,HEX…]` with `--program xdp|tc` and `--ingress
//! clients|backends` runs those frames alone, in order, on a fresh datapath.

use anyhow::{Context, Result, bail};
use sluice_tests::{bench::Flags, fuzz};

fn main() -> Result<()> {
    let f = Flags::parse(&[
        ("--count", "N"),
        ("--seed", "S"),
        ("--tc-percent", "P"),
        ("--object", "FILE"),
        ("--show", "N"),
        ("--replay", "HEX[,HEX...]"),
        ("--program", "xdp|tc"),
        ("--ingress", "clients|backends"),
        ("--known", "FINDING[,FINDING...]"),
    ])?;
    let object = f
        .text("--object")
        .map(|path| std::fs::read(&path).with_context(|| format!("--object {path}")))
        .transpose()?;
    if let Some(hexes) = f.text("--replay") {
        let program = fuzz::parse_program(&f.text("--program").unwrap_or("xdp".into()))?;
        let ingress = fuzz::parse_side(&f.text("--ingress").unwrap_or("clients".into()))?;
        let frames = hexes
            .split(',')
            .map(|h| {
                let bytes = fuzz::wire::unhex(h).map_err(anyhow::Error::msg)?;
                Ok((bytes, program, ingress))
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, line) in fuzz::replay(&frames, object.as_deref())?
            .into_iter()
            .enumerate()
        {
            println!("frame {i}: {line}");
        }
        return Ok(());
    }
    let seed = match f.text("--seed") {
        Some(_) => f.get("--seed", 0u64)?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    let mut opts = fuzz::Options::new(f.get("--count", 1_000_000u64)?, seed);
    opts.tc_percent = f.get("--tc-percent", 25u32)?;
    opts.keep_failures = f.get("--show", 10usize)?;
    opts.object = object;
    opts.progress_every = 100_000;
    for name in f.text("--known").iter().flat_map(|k| k.split(',')) {
        let finding = fuzz::oracle::finding::ALL
            .iter()
            .find(|f| **f == name)
            .with_context(|| {
                format!(
                    "--known {name:?}: not a finding the oracle names ({})",
                    fuzz::oracle::finding::ALL.join(", ")
                )
            })?;
        opts.known.push(finding);
    }
    if opts.tc_percent > 100 {
        bail!("--tc-percent {}: at most 100", opts.tc_percent);
    }
    println!(
        "fuzzing the datapath: seed {seed}, {} packets ({}% through TC)",
        opts.count, opts.tc_percent
    );
    let report = fuzz::run(&opts)?;
    println!("{report}");
    if report.failed() > 0 {
        bail!(
            "{} outputs failed the oracle (seed {seed})",
            report.failed()
        );
    }
    Ok(())
}
