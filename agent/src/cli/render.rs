//! The operator commands' output for people.

use crate::{
    api::{FlowsResponse, ServiceView, ServicesResponse},
    control::overrides::Entry,
    inspect::{explain::Explanation, status::StatusView},
};

use super::table::{Table, duration, opt};

pub fn status(s: &StatusView) -> String {
    let mut out = format!(
        "Sluice {} (commit {}, map layout {})\n",
        s.version, s.commit, s.map_layout
    );
    let agent = match (s.source.as_str(), s.ready) {
        ("agent", Some(ready)) => format!(
            "running, pid {}, up {}, {}",
            opt(s.pid),
            s.uptime_seconds.map_or("-".to_string(), duration),
            if ready { "ready" } else { "NOT READY" }
        ),
        _ => "NOT RUNNING (read from the pinned maps)".to_string(),
    };
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    line(&mut out, "Agent:", agent);
    if let Some(dir) = &s.pin_directory {
        line(&mut out, "Pinned:", dir.clone());
    }
    let attached: Vec<String> = s
        .attachments
        .iter()
        .map(|a| format!("{} ({})", a.interface, a.mode))
        .collect();
    line(
        &mut out,
        "Attached:",
        if attached.is_empty() {
            "nothing".to_string()
        } else {
            attached.join(", ")
        },
    );
    line(
        &mut out,
        "Services:",
        format!(
            "{} with {} backends ({} ejected, {} draining), {} override(s)",
            s.services, s.backends, s.ejected_backends, s.draining_backends, s.overrides
        ),
    );
    line(
        &mut out,
        "Conntrack:",
        format!(
            "{} of {} entries; half-open {} of {}",
            s.conntrack.entries,
            s.conntrack.capacity,
            s.conntrack.half_open_entries,
            s.conntrack.half_open_capacity
        ),
    );
    let discovery: Vec<String> = s
        .discovery
        .iter()
        .map(|d| {
            let mut v = format!("{} ({}): ", d.service, d.provider);
            v += if d.healthy { "healthy" } else { "FAILING" };
            if d.held_back {
                v += ", update held back (would empty it)";
            }
            if let Some(e) = &d.error {
                v += &format!(": {e}");
            }
            v
        })
        .collect();
    if !discovery.is_empty() {
        line(&mut out, "Discovery:", discovery.join("\n            "));
    }
    line(
        &mut out,
        "Events:",
        format!("{} sent, {} dropped", s.events.sent, s.events.dropped),
    );
    let nonzero = |m: &std::collections::BTreeMap<String, u64>| {
        let v: Vec<String> = m
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    line(&mut out, "Drops:", nonzero(&s.drops));
    line(&mut out, "Passed:", nonzero(&s.passed));
    out
}

pub fn services(r: &ServicesResponse) -> String {
    let mut t = Table::new(&[
        "SERVICE",
        "FRONTEND",
        "FWD",
        "CHOICE",
        "BACKENDS",
        "ACTIVE",
        "CONNS",
        "RETRIES",
        "DISCOVERY",
    ]);
    for s in &r.services {
        let count = |state: &str| s.backends.iter().filter(|b| b.state == state).count();
        let mut backends = format!("{}", s.backends.len());
        let (ejected, draining) = (count("ejected"), count("draining"));
        if ejected + draining > 0 {
            backends += &format!(" ({ejected} ejected, {draining} draining)");
        }
        t.row(vec![
            s.name.clone(),
            frontend(s),
            forwarding(s),
            choice(s),
            backends,
            s.backends
                .iter()
                .map(|b| b.active_connections)
                .sum::<u64>()
                .to_string(),
            s.connections_total.to_string(),
            s.retries_total.to_string(),
            s.discovery.as_ref().map_or("-".to_string(), |d| {
                format!(
                    "{} {}",
                    d.provider,
                    if d.healthy { "ok" } else { "FAILING" }
                )
            }),
        ]);
    }
    if t.is_empty() {
        return "no services\n".to_string();
    }
    t.render()
}

/// `dnat`, `snat`, `dsr` (L2) or `dsr-ipip`.
fn forwarding(s: &ServiceView) -> String {
    match s.dsr_encapsulation.as_deref() {
        Some("ipip") => "dsr-ipip".to_string(),
        _ => s.forwarding.clone(),
    }
}

/// How a new connection's backend is chosen: the algorithm, and the
/// affinity's timeout if the service has one (`maglev+affinity 60s`).
fn choice(s: &ServiceView) -> String {
    match s.affinity_timeout_seconds {
        Some(t) => format!("{}+affinity {t}s", s.algorithm),
        None => s.algorithm.clone(),
    }
}

fn frontend(s: &ServiceView) -> String {
    if s.vip.contains(':') {
        format!("[{}]:{}/{}", s.vip, s.port, s.protocol)
    } else {
        format!("{}:{}/{}", s.vip, s.port, s.protocol)
    }
}

pub fn backends(s: &ServiceView) -> String {
    let mut t = Table::new(&[
        "BACKEND",
        "STATE",
        "WEIGHT",
        "ACTIVE",
        "CONNS",
        "REFUSED",
        "TIMEOUT",
        "UNREACH",
        "EJECTIONS",
        "P50",
        "P99",
        "OVERRIDE",
    ]);
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}ms"));
    for b in &s.backends {
        let over = b.override_.map_or("-".to_string(), |o| {
            let mut parts = Vec::new();
            if o.drain {
                parts.push("drain".to_string());
            }
            if let Some(w) = o.weight {
                parts.push(format!("weight {w}"));
            }
            parts.join(", ")
        });
        t.row(vec![
            b.address.clone(),
            b.state.clone(),
            b.weight.to_string(),
            b.active_connections.to_string(),
            b.connections_total.to_string(),
            b.failures.refused.to_string(),
            b.failures.timeout.to_string(),
            b.failures.unreachable.to_string(),
            b.ejections_total.to_string(),
            ms(b.latency_p50_ms),
            ms(b.latency_p99_ms),
            over,
        ]);
    }
    let mut options = vec![forwarding(s), choice(s)];
    if let Some(blocks) = &s.allowed_sources {
        options.push(format!("from {}", blocks.join(" ")));
    }
    let head = format!("{} {} ({})\n", s.name, frontend(s), options.join("; "));
    if t.is_empty() {
        return head + "no backends\n";
    }
    head + &t.render()
}

pub fn flows(r: &FlowsResponse) -> String {
    let mut t = Table::new(&[
        "TABLE", "SERVICE", "PROTO", "CLIENT", "VIP", "BACKEND", "STATE", "IDLE", "SNAT",
    ]);
    for f in &r.flows {
        t.row(vec![
            f.table.clone(),
            f.service.clone(),
            f.protocol.clone(),
            f.client.clone(),
            f.vip.clone(),
            f.backend.clone(),
            f.state.clone(),
            duration(u64::from(f.idle_seconds)),
            opt(f.snat.as_deref()),
        ]);
    }
    let mut out = if t.is_empty() {
        String::new()
    } else {
        t.render()
    };
    out += &format!("{} of {} matching flows shown\n", r.flows.len(), r.matched);
    out
}

pub fn explanation(e: &Explanation) -> String {
    let mut out = format!("{} → {}/{}", e.client, e.vip, e.protocol);
    match (&e.service, &e.backend) {
        (Some(s), Some(b)) => {
            out += &format!(
                ": service {s} → backend {b} ({})\n",
                opt(e.backend_state.as_deref())
            )
        }
        (Some(s), None) => out += &format!(": service {s} → no backend\n"),
        _ => out += ": not a service\n",
    }
    out += &format!("  decided by: {}\n", e.decision);
    for why in &e.why {
        out += &format!("  {why}\n");
    }
    out
}

pub fn event(e: &serde_json::Value) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
    let time = e["time_ms"].as_u64().map_or("-".to_string(), |ms| {
        let secs = ms / 1000;
        format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60,
            ms % 1000
        )
    });
    let mut line = format!(
        "{time} {:<6} {} {} {} → {} via {}",
        s("kind"),
        s("service"),
        s("protocol"),
        s("client"),
        s("backend"),
        s("vip")
    );
    if let Some(r) = e["reason"].as_str() {
        line += &format!(" reason={r}");
    }
    if let Some(d) = e["duration_ms"].as_f64() {
        line += &format!(" {d:.3}ms");
    }
    line
}

pub fn override_entry(e: &Entry) -> String {
    let mut what = Vec::new();
    if e.value.drain {
        what.push("drained".to_string());
    }
    if let Some(w) = e.value.weight {
        what.push(format!("weight {w}"));
    }
    if what.is_empty() {
        format!(
            "{} {}: no override (config or discovery decides)\n",
            e.service, e.backend
        )
    } else {
        format!(
            "{} {}: {} (override, kept across restarts)\n",
            e.service,
            e.backend,
            what.join(", ")
        )
    }
}
