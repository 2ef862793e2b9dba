//! `cargo xtask`: install what is missing, build, run the demo, test, bench.

mod demo;
mod layers;
mod prereqs;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Sluice's build, demo, test and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Without arguments: the demo (namespaces, three HTTP backends, live
    /// traffic, the agent). With `-- ARGS`: the agent itself, `sluice ARGS`.
    ///
    /// Examples: `cargo xtask run`, `cargo xtask run -- run --config sluice.yaml`
    Run {
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// Everything CI checks: the kernel modules' layering, formatting, clippy
    /// (agent and eBPF), all tests.
    /// Extra arguments go to `cargo test`.
    Test {
        #[arg(last = true)]
        test_args: Vec<String>,
        /// Skip the lint steps (layering, fmt and clippy).
        #[arg(long)]
        no_lint: bool,
    },
    /// The kernel modules' layering, fmt and clippy only.
    Lint,
    /// Benchmarks (not tests): `datapath`, `failover`, `control-plane`,
    /// `bulk` (iperf3 through the VIP in every attach mode against direct
    /// routing), `e2e` (HTTP and UDP through Sluice next to iptables and
    /// nftables DNAT, HAProxy and direct routing; docs/benchmarks.md).
    Bench {
        #[arg(default_value = "datapath")]
        which: String,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Fuzzers (docs/fuzzing.md). `datapath`: generated and mutated packets
    /// through the kernel programs, judged by an independent oracle
    /// (`--count N`, `--seed S`, `--known FINDING,…`, `--replay HEX
    /// --program xdp|tc --ingress clients|backends`). `config`: the config
    /// parser and discovery decoders under proptest (`--cases N`).
    ///
    /// Examples: `cargo xtask fuzz datapath --count 1000000 --seed 7`,
    /// `cargo xtask fuzz config --cases 20000`
    Fuzz {
        which: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The soak (docs/benchmarks.md): the real agent (release) under mixed
    /// TCP and UDP traffic, config and DNS churn, `kill -9` restarts every
    /// 2–3 minutes and a SYN flood in the middle; reports failed
    /// connections and the agent's memory and table occupancy over time.
    /// Extra options: `--seed S`, `--flood-seconds S`, `--restarts off`
    /// (one agent throughout), `--out DIR` (default target/soak).
    ///
    /// Example: `cargo xtask soak --minutes 10`
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install what the build and the tests need, and nothing else.
    Setup,
}

/// What `bench e2e` compares Sluice with and drives it with: the peers
/// (iptables, nftables, HAProxy), the backends (nginx), the load (wrk,
/// sockperf), and conntrack to flush the kernel's tracking between modes.
const E2E_PEERS: &[(&str, &str)] = &[
    ("iptables", "iptables"),
    ("nftables", "nft"),
    ("haproxy", "haproxy"),
    ("nginx-light", "nginx"),
    ("wrk", "wrk"),
    ("sockperf", "sockperf"),
    ("conntrack", "conntrack"),
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => prereqs::ensure(prereqs::Need::Tests),
        Task::Run { agent_args } => {
            prereqs::ensure(prereqs::Need::Demo)?;
            cargo(&["build", "--release", "--locked", "-p", "sluice"])?;
            let bin = target_dir().join("release/sluice");
            if agent_args.is_empty() {
                demo::run(&bin)
            } else {
                let status = Command::new(&bin).args(&agent_args).status()?;
                std::process::exit(status.code().unwrap_or(1));
            }
        }
        Task::Lint => {
            prereqs::ensure(prereqs::Need::Build)?;
            lint()
        }
        Task::Test { test_args, no_lint } => {
            prereqs::ensure(prereqs::Need::Tests)?;
            if !no_lint {
                lint()?;
            }
            test(&test_args)
        }
        Task::Fuzz { which, args } => fuzz(&which, &args),
        Task::Soak { minutes, args } => soak(minutes, &args),
        Task::Bench { which, args } => {
            prereqs::ensure(prereqs::Need::Tests)?;
            let (bin, uses_agent) = match which.as_str() {
                "datapath" => ("bench-datapath", false),
                "failover" => {
                    prereqs::ensure_packages(&[("iptables", "iptables")])?;
                    ("bench-failover", true)
                }
                "control-plane" => ("bench-control-plane", true),
                "e2e" => {
                    prereqs::ensure_packages(E2E_PEERS)?;
                    ("bench-e2e", true)
                }
                "bulk" => {
                    prereqs::ensure_packages(&[("iperf3", "iperf3")])?;
                    ("bench-bulk", true)
                }
                other => bail!(
                    "unknown benchmark {other:?}; available: datapath, failover, control-plane, bulk, e2e"
                ),
            };
            if uses_agent {
                step("building the agent (release)");
                cargo(&["build", "--release", "--locked", "-p", "sluice"])?;
            }
            let mut envs = Vec::new();
            if which == "datapath" {
                envs.push(("SLUICE_BENCH_BARE_OBJECT", bare_object()?));
            }
            step(&format!("building and running {bin} (release)"));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let ok = run_tests_bin(bin, &args, envs)?;
            if !ok {
                bail!("benchmark {bin} failed");
            }
            Ok(())
        }
    }
}

/// `cargo xtask soak --minutes N ARGS`: the agent and the soak binary, both
/// release builds.
fn soak(minutes: f64, args: &[String]) -> Result<()> {
    prereqs::ensure(prereqs::Need::Tests)?;
    step("building the agent (release)");
    cargo(&["build", "--release", "--locked", "-p", "sluice"])?;
    step(&format!(
        "building and running the soak for {minutes} minutes (release)"
    ));
    let minutes = minutes.to_string();
    let mut a = vec!["--minutes", minutes.as_str()];
    a.extend(args.iter().map(String::as_str));
    let ok = run_tests_bin("soak", &a, Vec::<(&str, &str)>::new())?;
    if !ok {
        bail!("the soak failed (see its summary above)");
    }
    Ok(())
}

/// `cargo run --release -p sluice-tests --bin BIN -- ARGS` with `envs`
/// (the benchmarks and the soak): whether it succeeded.
fn run_tests_bin<K, V>(
    bin: &str,
    args: &[&str],
    envs: impl IntoIterator<Item = (K, V)>,
) -> Result<bool>
where
    K: AsRef<std::ffi::OsStr>,
    V: AsRef<std::ffi::OsStr>,
{
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "run",
            "--release",
            "--locked",
            "-p",
            "sluice-tests",
            "--bin",
            bin,
            "--",
        ])
        .args(args)
        .envs(envs)
        .current_dir(workspace_root())
        .status()?;
    Ok(status.success())
}

/// `cargo xtask fuzz datapath|config ARGS`.
fn fuzz(which: &str, args: &[String]) -> Result<()> {
    let ok = match which {
        "datapath" => {
            prereqs::ensure(prereqs::Need::Tests)?;
            step("building and running the datapath fuzzer (release)");
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tests_bin("fuzz-datapath", &args, Vec::<(&str, &str)>::new())?
        }
        "config" => {
            prereqs::ensure(prereqs::Need::Build)?;
            let cases = match args {
                [] => "5000".to_string(),
                [flag, n] if flag == "--cases" => n.clone(),
                _ => bail!("cargo xtask fuzz config [--cases N]"),
            };
            step(&format!(
                "fuzzing the config parser and discovery decoders ({cases} cases each)"
            ));
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["test", "--locked", "-p", "sluice", "--lib", "fuzz"])
                .env("PROPTEST_CASES", cases)
                .current_dir(workspace_root())
                .status()?
                .success()
        }
        other => bail!("unknown fuzzer {other:?}; available: datapath, config"),
    };
    if !ok {
        bail!("fuzzer {which} failed");
    }
    Ok(())
}

pub fn step(what: &str) {
    eprintln!("\x1b[1m==> {what}\x1b[0m");
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

fn lint() -> Result<()> {
    // Cheap and first: agent-ebpf/src/main.rs's module order is its layering.
    let (modules, imports) =
        layers::check(&workspace_root().join("agent-ebpf/src"), "agent-ebpf/src")?;
    step(&format!(
        "kernel module layers: {modules} modules, {imports} imports of modules above, \
         no upward import"
    ));
    step("cargo fmt --check (workspace and eBPF crate)");
    cargo(&["fmt", "--all", "--", "--check"])?;
    let ebpf = workspace_root().join("agent-ebpf");
    run_in(
        &ebpf,
        "rustup",
        &["run", "nightly", "cargo", "fmt", "--", "--check"],
    )?;
    step("cargo clippy -D warnings (agent, tests, xtask)");
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ])?;
    step("cargo clippy -D warnings (eBPF crate, bpfel-unknown-none)");
    let target_dir = workspace_root().join("target/ebpf");
    ebpf_cargo("clippy", &target_dir, &["--", "-D", "warnings"])
}

/// `cargo SUBCOMMAND` on the eBPF crate: nightly, `bpfel-unknown-none`,
/// Where cargo puts this workspace's builds: `CARGO_TARGET_DIR` when set
/// (several checkouts sharing one cache), else `target/`.
fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `-Z build-std=core`, release profile, into `target_dir`.
fn ebpf_cargo(subcommand: &str, target_dir: &std::path::Path, extra: &[&str]) -> Result<()> {
    let target_dir = target_dir.to_str().context("target directory path")?;
    let mut args = vec![
        "run",
        "nightly",
        "cargo",
        subcommand,
        "--release",
        "--locked",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        target_dir,
    ];
    args.extend_from_slice(extra);
    run_in(&workspace_root().join("agent-ebpf"), "rustup", &args)
}

fn run_in(dir: &std::path::Path, program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed in {}", args.join(" "), dir.display());
    }
    Ok(())
}

/// The eBPF object built without statistics and events: the datapath
/// benchmark compares against it, the hitless test upgrades to it.
fn bare_object() -> Result<std::path::PathBuf> {
    step("building the eBPF object without statistics and events");
    let target_dir = workspace_root().join("target/ebpf-bare");
    ebpf_cargo("build", &target_dir, &["--features", "no-stats"])?;
    Ok(target_dir.join("bpfel-unknown-none/release/sluice"))
}

fn test(extra: &[String]) -> Result<()> {
    step("building the agent (cargo build -p sluice)");
    cargo(&["build", "--locked", "-p", "sluice"])?;
    let upgrade_object = bare_object()?;
    step("running every test (unit, BPF_PROG_TEST_RUN, network namespaces)");
    // Every test binary runs even when one fails: one run shows all failures.
    let mut args = vec!["test", "--workspace", "--locked", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    // The tests would find the binary next to themselves; this makes it explicit.
    let bin = target_dir().join("debug/sluice");
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&args)
        .env("SLUICE_BIN", &bin)
        .env("SLUICE_UPGRADE_OBJECT", &upgrade_object)
        .env("SLUICE_HELM_PYTHON", prereqs::helm_sdk_python())
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // Echo the output and add up every test binary's result line, so the run
    // ends with one total rather than the last binary's (often "0 passed").
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    println!("\ntotal: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_takes_minutes_and_passes_the_rest_on() {
        let cli = Cli::try_parse_from(["xtask", "soak", "--minutes", "3", "--seed", "7"]).unwrap();
        let Task::Soak { minutes, args } = cli.task else {
            panic!("not the soak");
        };
        assert_eq!(minutes, 3.0);
        assert_eq!(args, ["--seed", "7"]);
        let cli = Cli::try_parse_from(["xtask", "soak"]).unwrap();
        assert!(matches!(cli.task, Task::Soak { minutes, .. } if minutes == 10.0));
    }
}
