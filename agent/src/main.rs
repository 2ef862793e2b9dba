//! `sluice`: the agent's command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use sluice::{
    agent::{self, RunError},
    config,
};

/// Sluice: an eBPF L4 load balancer that learns from real traffic.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground: attach the datapath, apply the config
    /// (and every later change to it), serve metrics and the API.
    ///
    /// Example: sluice run --config /etc/sluice/sluice.yaml --listen 0.0.0.0:9464
    Run {
        /// The YAML config file; changes to it are applied live.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Address of the HTTP server (/metrics, /healthz, /readyz, /api/v1/services).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
        listen: SocketAddr,
        /// Run this build of the kernel programs instead of the built-in one
        /// (with pinning: swapped into the running links atomically).
        #[arg(long, value_name = "FILE")]
        ebpf_object: Option<PathBuf>,
    },
    /// Remove the pinned datapath of a config's pinning.directory: the
    /// programs detach, the maps (and the connections they track) go.
    ///
    /// Example: sluice cleanup --config /etc/sluice/sluice.yaml
    Cleanup {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a config file and exit: 0 if valid, 2 with the bad field named if not.
    ///
    /// Example: sluice check --config sluice.yaml
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// Exit status for a config that can't be parsed or validated (the
/// contract's), and for a host that must be changed before the agent can
/// start (a pin directory others can write, a kernel setting it can't set).
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(v) => {
                println!(
                    "{}: ok ({} services, {} interfaces)",
                    config.display(),
                    v.services.len(),
                    v.raw.interfaces.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Cleanup { config } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let Some(p) = cfg.raw.pinning else {
                println!(
                    "{}: no pinning.directory; nothing to clean up",
                    config.display()
                );
                return ExitCode::SUCCESS;
            };
            match sluice::pinning::cleanup(std::path::Path::new(&p.directory)) {
                Ok(n) => {
                    println!("{}: removed {n} pins", p.directory);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run {
            config,
            listen,
            ebpf_object,
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(config, listen, ebpf_object)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(RunError::Config(e)) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
                // The host needs changing first: the same status, so a
                // supervisor sees the same kind of failure.
                Err(RunError::Refused(e)) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
                Err(RunError::Other(e)) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
