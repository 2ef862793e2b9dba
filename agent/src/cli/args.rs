//! The command line: every flag also reads a `SLUICE_*` environment
//! variable (named in `--help`).

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::http;

/// Sluice: an eBPF L4 load balancer that learns from real traffic.
///
/// `sluice run` is the agent; the other commands are for operators on the
/// node, as root: they talk to the running agent over its control socket,
/// and read the pinned maps when it is down.
#[derive(Parser)]
#[command(version = crate::build_info::long_version(), about, long_about)]
pub struct Cli {
    /// Log lines as text (for people) or JSON (for log collectors).
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent in the foreground: attach the datapath, apply the config
    /// (and every later change to it), serve metrics, the API and the
    /// control socket.
    ///
    /// Example: sluice run --config /etc/sluice/sluice.yaml --listen 10.0.0.5:9464
    Run {
        /// The YAML config file; changes to it are applied live.
        #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        http: HttpArgs,
        /// Run this build of the kernel programs instead of the built-in one
        /// (with pinning: swapped into the running links atomically).
        #[arg(long, env = "SLUICE_EBPF_OBJECT_FILE", value_name = "FILE")]
        ebpf_object: Option<PathBuf>,
        /// The control socket, instead of the config's control.socket (for
        /// several agents on one host).
        #[arg(long, env = "SLUICE_CONTROL_SOCKET", value_name = "PATH")]
        control_socket: Option<PathBuf>,
        /// The state directory (runtime overrides), instead of the config's
        /// control.state_directory.
        #[arg(long, env = "SLUICE_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Remove the pinned datapath of a config's pinning.directory: the
    /// programs detach, the maps (and the connections they track) go.
    ///
    /// Example: sluice cleanup --config /etc/sluice/sluice.yaml
    Cleanup {
        #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a config file and exit: 0 if valid, 2 with the bad field named if not.
    ///
    /// Example: sluice check --config sluice.yaml
    Check {
        #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// The agent and its datapath: version, map layout, attachments,
    /// readiness, discovery health, drops by reason.
    ///
    /// Example: sluice status
    Status(Target),
    /// Every service: frontend, forwarding, backends by state, connections.
    ///
    /// Example: sluice services -o json
    Services(Target),
    /// One service's backends: state, weight, connections, failures by
    /// reason, ejections, connect latency p50/p99, overrides.
    ///
    /// Example: sluice backends web
    Backends {
        service: String,
        #[command(flatten)]
        target: Target,
    },
    /// The live flows (half-open connects first).
    ///
    /// Example: sluice conntrack --service web --backend 10.0.2.2:8080 --limit 20
    Conntrack {
        #[arg(long, env = "SLUICE_SERVICE", value_name = "SERVICE")]
        service: Option<String>,
        /// A backend address as `sluice backends` shows it.
        #[arg(long, env = "SLUICE_BACKEND", value_name = "ADDR")]
        backend: Option<String>,
        #[arg(long, env = "SLUICE_LIMIT", value_name = "N", default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Which backend a flow goes to, and why: its conntrack entry, or the
    /// Maglev slot, the ejected or draining backends skipped, and where a
    /// refused connect would be retried.
    ///
    /// Example: sluice explain 10.1.2.3:40000 10.0.0.1:80/tcp
    Explain {
        /// The client's address and source port.
        #[arg(value_name = "CLIENT_IP:PORT")]
        client: String,
        /// The service's frontend (protocol defaults to tcp).
        #[arg(value_name = "VIP:PORT/PROTO")]
        frontend: String,
        #[command(flatten)]
        target: Target,
    },
    /// Connection events: open, close, fail (refused, timeout, unreachable), retry, eject.
    ///
    /// Example: sluice events -f --service web --kind fail
    Events {
        /// Keep following new events (without: the recent ones, then exit).
        #[arg(short, long, env = "SLUICE_FOLLOW")]
        follow: bool,
        #[arg(long, env = "SLUICE_SERVICE", value_name = "SERVICE")]
        service: Option<String>,
        /// An event kind: open, close, fail, retry or eject.
        #[arg(long, env = "SLUICE_KIND", value_name = "KIND")]
        kind: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Stop new connections to a backend; its established ones finish. A
    /// runtime override on top of config or discovery, kept across restarts.
    ///
    /// Example: sluice drain web 10.0.2.2:8080
    Drain {
        service: String,
        backend: String,
        /// Drop the drain override (as `sluice undrain`).
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Drop a backend's drain override: it takes new connections again (at
    /// its configured or overridden weight).
    ///
    /// Example: sluice undrain web 10.0.2.2:8080
    Undrain {
        service: String,
        backend: String,
        #[command(flatten)]
        target: Target,
    },
    /// Set a backend's weight (0 to 1000) over the configured one, or
    /// `--clear` the override. Kept across restarts.
    ///
    /// Example: sluice weight web 10.0.2.2:8080 5
    Weight {
        service: String,
        backend: String,
        #[arg(required_unless_present = "clear")]
        weight: Option<u32>,
        #[arg(long, conflicts_with = "weight")]
        clear: bool,
        #[command(flatten)]
        target: Target,
    },
    /// On a backend host of a service with `forwarding: dsr` and
    /// `dsr.encapsulation: ipip`: unwrap the IPIP / IP6IP6 packets the load
    /// balancer sends to these VIPs (each must be on a local interface,
    /// usually the loopback), until SIGINT or SIGTERM. Needs no ipip module.
    ///
    /// Example: sluice backend-decap --interface eth0 --vip 10.0.0.1 --vip fd00::1
    BackendDecap {
        /// The interface the tunnelled packets arrive on.
        #[arg(long, env = "SLUICE_DECAP_INTERFACE", value_name = "IF")]
        interface: String,
        /// A VIP to unwrap packets for (repeat the flag; in the variable,
        /// comma-separated).
        #[arg(
            long = "vip",
            env = "SLUICE_DECAP_VIPS",
            value_name = "VIP",
            value_delimiter = ',',
            required = true
        )]
        vips: Vec<std::net::IpAddr>,
    },
    /// Print a shell completion script.
    ///
    /// Example: sluice completions bash > /etc/bash_completion.d/sluice
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Where the operator commands find the agent.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// The agent's config: its control.socket, and its pinning.directory
    /// (read when the agent is down).
    #[arg(
        long,
        env = "SLUICE_CONFIG",
        value_name = "FILE",
        default_value = "/etc/sluice/sluice.yaml"
    )]
    pub config: PathBuf,
    /// The control socket [default: the config's control.socket, else
    /// /run/sluice/sluice.sock].
    #[arg(long, env = "SLUICE_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// table (for people) or json (for scripts).
    #[arg(short, long, env = "SLUICE_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Where the agent serves HTTP, to whom, and its limits.
#[derive(Args)]
pub struct HttpArgs {
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
    pub listen: SocketAddr,
    /// Address for the API (/api/v1/*, the event stream, the dashboard
    /// at /) [default: loopback, on the --listen port]. Connections over
    /// loopback need no token; a non-loopback address exposes the API and
    /// needs --api-token-file.
    #[arg(long, env = "SLUICE_API_LISTEN", value_name = "ADDR", value_parser = http::parse_listen_addr)]
    pub api_listen: Option<SocketAddr>,
    /// File holding the bearer token an exposed API requires
    /// (`Authorization: Bearer TOKEN`). Read again when it changes.
    #[arg(long, env = "SLUICE_API_TOKEN_FILE", value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Open HTTP connections per listener. At the cap, a new connection
    /// takes the slot of the oldest idle one; if none is idle, it is closed.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS", value_name = "N", default_value_t = NonZeroUsize::new(http::MAX_CONNECTIONS).unwrap())]
    pub max_connections: NonZeroUsize,
    /// Open event streams (/api/v1/events); more are answered 503.
    #[arg(long, env = "SLUICE_MAX_EVENT_STREAMS", value_name = "N", default_value_t = NonZeroUsize::new(http::MAX_EVENT_STREAMS).unwrap())]
    pub max_event_streams: NonZeroUsize,
}

impl HttpArgs {
    pub fn options(&self) -> Result<http::Options, http::ExposureError> {
        http::Options::new(
            self.listen,
            self.api_listen,
            self.api_token_file.as_deref(),
            self.max_connections,
            self.max_event_streams,
        )
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Flags that change what a command does rather than where or how it
    /// runs: a variable left in an operator's shell must not turn
    /// `sluice drain` into an undrain.
    const NO_ENV: [&str; 1] = ["clear"];

    #[test]
    fn every_flag_has_a_sluice_environment_variable() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_positional() || ["help", "version"].contains(&id) || NO_ENV.contains(&id)
                {
                    continue;
                }
                match arg.get_env() {
                    Some(env) if env.to_string_lossy().starts_with("SLUICE_") => {}
                    _ => missing.push(format!("{path} --{id}")),
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "sluice", &mut missing);
        assert!(
            missing.is_empty(),
            "flags without a SLUICE_* variable: {missing:?}"
        );
    }

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
