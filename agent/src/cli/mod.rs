//! The `sluice` operator commands: status, services, backends, conntrack,
//! explain, events, drain, undrain, weight. They ask the running agent over
//! its control socket; when none answers, the read commands open the pinned
//! maps of the config's `pinning.directory` themselves.

pub mod args;
mod render;
mod table;

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    api::{FlowsResponse, ServicesResponse, path},
    config::{self, Validated},
    control::{
        client::{Client, ClientError},
        overrides::{Action, Change, Entry},
    },
    inspect::{explain::Explanation, pinned::Pinned, status::StatusView},
};
use args::{Command, Output, Target};

/// Runs one operator command; errors are printed, the status says how it went.
pub fn operate(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Status(target) => {
            let at = Agent::find(&target);
            let status: StatusView = at.read(path::STATUS, |p, dir| Ok(p.status(dir))).await?;
            at.print(&status, render::status)
        }
        Command::Services(target) => {
            let at = Agent::find(&target);
            let services = at.read(path::SERVICES, offline_services).await?;
            at.print(&services, render::services)
        }
        Command::Backends { service, target } => {
            let at = Agent::find(&target);
            let services: ServicesResponse = at.read(path::SERVICES, offline_services).await?;
            let names: Vec<&str> = services.services.iter().map(|s| s.name.as_str()).collect();
            let Some(one) = services.services.iter().find(|s| s.name == service) else {
                bail!("no service {service:?} (services: {})", names.join(", "));
            };
            at.print(one, render::backends)
        }
        Command::Conntrack {
            service,
            backend,
            limit,
            target,
        } => {
            let filter = crate::inspect::flows::FlowFilter {
                service,
                backend,
                limit: Some(limit),
            };
            let url = format!(
                "{}?{}",
                path::CONNTRACK,
                query(&[
                    ("service", filter.service.as_deref()),
                    ("backend", filter.backend.as_deref()),
                    ("limit", Some(&limit.to_string())),
                ])
            );
            let at = Agent::find(&target);
            let flows: FlowsResponse = at
                .read(&url, |p, _| {
                    let (flows, matched) =
                        crate::inspect::flows::list(&p.tables, &p.snapshot, &filter);
                    Ok(FlowsResponse { flows, matched })
                })
                .await?;
            at.print(&flows, render::flows)
        }
        Command::Explain {
            client,
            frontend,
            target,
        } => {
            // Checked here too: a typo gets its message without a round trip.
            let client_addr =
                crate::inspect::explain::parse_client(&client).map_err(|e| anyhow!(e))?;
            let (vip, protocol) =
                crate::inspect::explain::parse_frontend(&frontend).map_err(|e| anyhow!(e))?;
            let url = format!(
                "{}?{}",
                path::EXPLAIN,
                query(&[("client", Some(&client)), ("frontend", Some(&frontend))])
            );
            let at = Agent::find(&target);
            let answer: Explanation = at
                .read(&url, |p, _| {
                    Ok(crate::inspect::explain::explain(
                        &p.tables,
                        &p.snapshot,
                        client_addr,
                        vip,
                        protocol,
                    ))
                })
                .await?;
            at.print(&answer, render::explanation)
        }
        Command::Events {
            follow,
            service,
            kind,
            target,
        } => events(&Agent::find(&target), follow, service, kind).await,
        Command::Drain {
            service,
            backend,
            clear,
            target,
        } => {
            let action = if clear {
                Action::Undrain
            } else {
                Action::Drain
            };
            change(&target, service, &backend, action).await
        }
        Command::Undrain {
            service,
            backend,
            target,
        } => change(&target, service, &backend, Action::Undrain).await,
        Command::Weight {
            service,
            backend,
            weight,
            clear,
            target,
        } => {
            let action = match (weight, clear) {
                (_, true) => Action::ClearWeight,
                (Some(weight), false) => Action::Weight { weight },
                (None, false) => bail!("give a weight (0 to 1000) or --clear"),
            };
            change(&target, service, &backend, action).await
        }
        Command::Run { .. }
        | Command::Cleanup { .. }
        | Command::Check { .. }
        | Command::BackendDecap { .. }
        | Command::Completions { .. } => {
            unreachable!("handled by main")
        }
    }
}

/// The running agent, or the way to read its pinned maps.
struct Agent {
    client: Client,
    config_path: std::path::PathBuf,
    /// The config, if it could be read (names services, gives the pin
    /// directory).
    config: Result<Validated, config::ConfigError>,
    output: Output,
}

impl Agent {
    fn find(target: &Target) -> Self {
        let config = config::load(&target.config);
        let socket = match (&target.socket, &config) {
            (Some(s), _) => s.clone(),
            (None, Ok(c)) => c.raw.control.socket.clone().into(),
            (None, Err(_)) => config::DEFAULT_CONTROL_SOCKET.into(),
        };
        Self {
            client: Client::new(&socket),
            config_path: target.config.clone(),
            config,
            output: target.output,
        }
    }

    /// GET `path` from the agent; if none answers, `offline` answers from
    /// the pinned maps (said on stderr).
    async fn read<T: DeserializeOwned>(
        &self,
        path: &str,
        offline: impl FnOnce(&Pinned, &Path) -> Result<T>,
    ) -> Result<T> {
        let unreachable = match self.client.get(path).await {
            Ok(answer) => return Ok(answer),
            Err(e @ ClientError::Unreachable { .. }) => e,
            Err(e) => return Err(e.into()),
        };
        let config = self.config.as_ref().map_err(|e| {
            anyhow!("{unreachable}; and the config can't be read to find pinned maps instead: {e}")
        })?;
        let Some(pinning) = &config.raw.pinning else {
            bail!(
                "{unreachable}; {} has no pinning.directory, so without the agent there is nothing to read",
                self.config_path.display()
            );
        };
        let dir = Path::new(&pinning.directory);
        let pinned = crate::inspect::pinned::open(dir, &config.services)
            .with_context(|| format!("{unreachable}; reading the pinned datapath instead"))?;
        eprintln!(
            "note: {unreachable}; showing the datapath pinned under {} (names from {})",
            dir.display(),
            self.config_path.display()
        );
        offline(&pinned, dir)
    }

    fn print<T: Serialize + ?Sized>(&self, value: &T, human: fn(&T) -> String) -> Result<()> {
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Output::Table => print!("{}", human(value)),
        }
        Ok(())
    }
}

fn offline_services(p: &Pinned, _: &Path) -> Result<ServicesResponse> {
    Ok(ServicesResponse {
        services: crate::api::service_views(None, None, &p.counters, &p.snapshot),
    })
}

async fn events(
    at: &Agent,
    follow: bool,
    service: Option<String>,
    kind: Option<String>,
) -> Result<()> {
    // False once stdout is closed (`| head`): then stop.
    let show = |e: &serde_json::Value| {
        use std::io::Write as _;
        let line = match at.output {
            Output::Json => e.to_string(),
            Output::Table => render::event(e),
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    };
    let filter = query(&[("service", service.as_deref()), ("kind", kind.as_deref())]);
    // Following, the stream is opened before the recent events are asked
    // for: an event between the two shows in both (and once here), never
    // in neither.
    let mut stream = match follow {
        true => Some(
            at.client
                .subscribe(&format!("{}?{filter}", path::EVENTS))
                .await?,
        ),
        false => None,
    };
    let recent: Vec<serde_json::Value> = at
        .client
        .get(&format!("{}?limit=50&{filter}", path::EVENTS_RECENT))
        .await?;
    for e in &recent {
        if !show(e) {
            return Ok(());
        }
    }
    let Some(stream) = stream.as_mut() else {
        return Ok(());
    };
    let shown: std::collections::HashSet<String> = recent.iter().map(|e| e.to_string()).collect();
    while let Some(data) = stream.next().await? {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(&data) else {
            continue;
        };
        if shown.contains(&e.to_string()) {
            continue;
        }
        if !show(&e) {
            break;
        }
    }
    Ok(())
}

async fn change(target: &Target, service: String, backend: &str, action: Action) -> Result<()> {
    let backend = backend.parse().map_err(|_| {
        anyhow!(
            "{backend}: expected a backend address IP:PORT as `sluice backends {service}` shows it"
        )
    })?;
    let at = Agent::find(target);
    let change = Change {
        service,
        backend,
        action,
    };
    let entry: Entry = at
        .client
        .post(path::OVERRIDES, &change)
        .await
        .map_err(|e| match e {
            e @ ClientError::Unreachable { .. } => {
                anyhow!("{e}: overrides are changed by the running agent")
            }
            e => e.into(),
        })?;
    at.print(&entry, render::override_entry)
}

/// `s` as a URL query value: every byte but the unreserved ones
/// (RFC 3986) percent-encoded.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `k=v&…` of the pairs that have a value, percent-encoded.
fn query(pairs: &[(&str, Option<&str>)]) -> String {
    pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", percent_encode(v))))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            super::query(&[
                ("client", Some("[fd00::1]:80")),
                ("x", None),
                ("s", Some("a b"))
            ]),
            "client=%5Bfd00%3A%3A1%5D%3A80&s=a%20b"
        );
    }
}
