//! `sluice`: the agent and the operator commands.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use sluice::{
    agent::{self, RunError},
    cli::args::{Cli, Command, LogFormat},
    config,
};

/// Exit status for a config that can't be parsed or validated (the
/// contract's), for HTTP flags that would expose the API unprotected, and
/// for a host that must be changed before the agent can start (a pin
/// directory others can write, a kernel setting it can't set).
const EXIT_BAD_CONFIG: u8 = 2;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        // Colours only for a terminal: log files and collectors get plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);

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
        Command::Cleanup { config } => cleanup(&config),
        Command::Run {
            config,
            http,
            ebpf_object,
            control_socket,
            state_dir,
        } => {
            let http = match http.options() {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let control = sluice::control::PathFlags {
                socket: control_socket,
                state_directory: state_dir,
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(config, http, ebpf_object, control)) {
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
        Command::BackendDecap { interface, vips } => match sluice::decap::run(&interface, &vips) {
            Ok(c) => {
                println!(
                    "detached from {interface}: {} packets unwrapped, {} malformed dropped, \
                     {} encapsulated to other addresses passed untouched",
                    c.decapsulated, c.malformed, c.not_ours
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sluice", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        operator => sluice::cli::operate(operator),
    }
}

fn cleanup(config: &std::path::Path) -> ExitCode {
    let cfg = match config::load(config) {
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
