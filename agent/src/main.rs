//! `sluice`: the agent's command line.

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use sluice::{
    agent::{self, RunError},
    config, http,
};

/// Sluice: an eBPF L4 load balancer that learns from real traffic.
#[derive(Parser)]
#[command(version = sluice::build_info::long_version(), about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground: attach the datapath, apply the config
    /// (and every later change to it), serve metrics and the API.
    ///
    /// Example: sluice run --config /etc/sluice/sluice.yaml --listen 10.0.0.5:9464
    Run {
        /// The YAML config file; changes to it are applied live.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        http: HttpArgs,
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

/// Where the agent serves HTTP, to whom, and its limits.
#[derive(Args)]
struct HttpArgs {
    /// Address for /metrics, /healthz and /readyz: loopback, or a node or
    /// pod address (they carry no client address). A loopback address (the
    /// default) serves the API too. IP:PORT, or [IP]:PORT for either family.
    #[arg(
        long,
        env = "SLUICE_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:9464",
        value_parser = http::parse_listen_addr
    )]
    listen: SocketAddr,
    /// Address for the API (/api/v1/*, the event stream, the dashboard
    /// at /) [default: loopback, on the --listen port]. Connections over
    /// loopback need no token; a non-loopback address exposes the API and
    /// needs --api-token-file.
    #[arg(long, env = "SLUICE_API_LISTEN", value_name = "ADDR", value_parser = http::parse_listen_addr)]
    api_listen: Option<SocketAddr>,
    /// File holding the bearer token an exposed API requires
    /// (`Authorization: Bearer TOKEN`). Read again when it changes.
    #[arg(long, env = "SLUICE_API_TOKEN_FILE", value_name = "FILE")]
    api_token_file: Option<PathBuf>,
    /// Open HTTP connections per listener. At the cap, a new connection
    /// takes the slot of the oldest idle one; if none is idle, it is closed.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", value_name = "N", default_value_t = NonZeroUsize::new(http::MAX_CONNECTIONS).unwrap())]
    max_connections: NonZeroUsize,
    /// Open event streams (/api/v1/events); more are answered 503.
    #[arg(long, env = "SLUICE_MAX_EVENT_STREAMS", value_name = "N", default_value_t = NonZeroUsize::new(http::MAX_EVENT_STREAMS).unwrap())]
    max_event_streams: NonZeroUsize,
}

impl HttpArgs {
    fn options(&self) -> Result<http::Options, http::ExposureError> {
        http::Options::new(
            self.listen,
            self.api_listen,
            self.api_token_file.as_deref(),
            self.max_connections,
            self.max_event_streams,
        )
    }
}

/// Exit status for a config that can't be parsed or validated (the
/// contract's), for HTTP flags that would expose the API unprotected, and
/// for a host that must be changed before the agent can start (a pin
/// directory others can write, a kernel setting it can't set).
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
            http,
            ebpf_object,
        } => {
            let http = match http.options() {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(config, http, ebpf_object)) {
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
