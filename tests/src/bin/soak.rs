//! `cargo xtask soak --minutes N`: the real agent under mixed TCP and UDP
//! traffic, config and DNS churn, `kill -9` restarts and a SYN flood, for
//! N minutes (see `sluice_tests::soak`). Prints a summary, writes it as
//! JSON with the agents' logs, and exits 1 if a connection failed outside
//! the flood and the restarts, or the agent's memory or the flow tables
//! grew.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use sluice_tests::{
    bench::Flags,
    soak::{self, Options},
};

/// Set by SIGINT or SIGTERM: the soak ends early and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() -> Result<()> {
    let f = Flags::parse(&[
        ("--minutes", "N"),
        ("--seed", "S"),
        ("--flood-seconds", "S"),
        ("--restarts", "on|off"),
        ("--out", "DIR"),
    ])?;
    let minutes: f64 = f.get("--minutes", 10.0)?;
    if minutes.is_nan() || minutes < 1.0 {
        bail!("--minutes {minutes}: at least 1 (the first minute is the baseline)");
    }
    let mut opts = Options::for_minutes(minutes);
    opts.seed = f.get("--seed", 1u64)?;
    opts.flood_for = Duration::from_secs(f.get("--flood-seconds", 10u64)?);
    match f.text("--restarts").as_deref() {
        None | Some("on") => {}
        // One agent for the whole run: its memory over all of it.
        Some("off") => opts.restart_every = None,
        Some(other) => bail!("--restarts {other:?}: on or off"),
    }
    // By default the workspace's target/soak (this crate is tests/).
    let out: PathBuf = f.text("--out").map(PathBuf::from).unwrap_or_else(|| {
        let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        tests.parent().unwrap_or(tests).join("target/soak")
    });
    opts.keep_logs = Some(out.join("logs"));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    opts.interrupt = Some(&INTERRUPTED);

    let seen = soak::run(&opts)?;
    println!("{}", seen.summary());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(&seen.to_json())?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!(
        "report: {}; logs: {}",
        json.display(),
        out.join("logs").display()
    );
    if !seen.verdict().is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
