//! The Kubernetes deployment: every manifest parses as its k8s-openapi type
//! with no field lost; the DaemonSet runs the real CLI with arguments it
//! accepts and a config it validates; ports and probe paths match the
//! agent's; RBAC is read-only on Services and EndpointSlices; the Helm
//! chart renders (default values) to exactly the plain manifests; the
//! dashboards shipped in them are the Grafana dashboard file.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sluice_tests::{TempDir, helm, sluice_bin};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Every document of a multi-document YAML text, as JSON values.
fn documents(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        out.push(serde_json::to_value(v)?);
    }
    Ok(out)
}

fn plain_manifests() -> Result<Vec<Value>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("deploy/kubernetes"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        out.extend(
            documents(&std::fs::read_to_string(&f)?).with_context(|| f.display().to_string())?,
        );
    }
    Ok(out)
}

/// Parses as `T` and back: a misspelt or misplaced field would be lost on
/// the way and show as a difference.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T> {
    let t: T = serde_json::from_value(doc.clone())
        .with_context(|| format!("{} {} does not parse", doc["kind"], doc["metadata"]["name"]))?;
    let back = serde_json::to_value(&t)?;
    if let Some(path) = lost(doc, &back, String::new()) {
        bail!(
            "{} {}: field {path} is not part of the type (misspelt or misplaced?)",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }
    Ok(t)
}

/// The first path in `a` that `b` doesn't have (with the same value).
fn lost(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.iter().find_map(|(k, v)| match y.get(k) {
            None if !v.is_null() => Some(format!("{path}.{k}")),
            None => None,
            Some(w) => lost(v, w, format!("{path}.{k}")),
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| lost(v, w, format!("{path}[{i}]"))),
        // Quantities and int-or-string ports may change representation.
        (Value::Number(n), Value::String(s)) | (Value::String(s), Value::Number(n)) => {
            (n.to_string() != *s).then_some(path)
        }
        _ => (a != b).then_some(path),
    }
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("no {kind} in the manifests"))
}

#[test]
fn manifests_parse_as_kubernetes_types_and_match_the_agent() -> Result<()> {
    let docs = plain_manifests()?;
    let mut kinds = Vec::new();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or("");
        kinds.push(kind.to_string());
        match kind {
            "Namespace" => drop(typed::<Namespace>(d)?),
            "ServiceAccount" => drop(typed::<ServiceAccount>(d)?),
            "ClusterRole" => drop(typed::<ClusterRole>(d)?),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(d)?),
            "ConfigMap" => drop(typed::<ConfigMap>(d)?),
            "DaemonSet" => drop(typed::<DaemonSet>(d)?),
            "Service" => drop(typed::<Service>(d)?),
            // A CRD (prometheus-operator): checked by hand below.
            "ServiceMonitor" => {}
            other => bail!("unexpected kind {other}"),
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );

    // RBAC: get/list/watch on services and endpointslices, nothing more.
    let role: ClusterRole = typed(find(&docs, "ClusterRole")?)?;
    let mut granted = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        for r in rule.resources.unwrap_or_default() {
            granted.push((r, rule.verbs.clone()));
        }
    }
    granted.sort();
    let read = vec!["get".to_string(), "list".into(), "watch".into()];
    assert_eq!(
        granted,
        [
            ("endpointslices".to_string(), read.clone()),
            ("services".to_string(), read)
        ]
    );

    // The DaemonSet.
    let ds: DaemonSet = typed(find(&docs, "DaemonSet")?)?;
    assert_least_privilege(&ds)?;
    let spec = ds.spec.context("spec")?;
    let strategy = spec.update_strategy.context("updateStrategy")?;
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let max_unavailable = serde_json::to_value(
        strategy
            .rolling_update
            .and_then(|r| r.max_unavailable)
            .context("maxUnavailable")?,
    )?;
    assert_eq!(max_unavailable, Value::from(1));
    let pod = spec.template.spec.context("pod spec")?;
    assert_eq!(pod.host_network, Some(true));
    let c = pod
        .containers
        .iter()
        .find(|c| c.name == "sluice")
        .context("sluice container")?;
    assert!(
        c.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .is_some(),
        "resource requests"
    );
    let env_node = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(env_node.as_deref(), Some("spec.nodeName"));
    let args = c.args.clone().context("args")?;

    // The args are the real CLI's: every flag is one `sluice run` has.
    assert_eq!(args[0], "run");
    let help = Command::new(sluice_bin())
        .args(["run", "--help"])
        .output()?;
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(flag.as_str()),
            "`sluice run` has no {flag}:\n{help}"
        );
    }
    let arg = |name: &str| -> Result<String> {
        let i = args
            .iter()
            .position(|a| a == name)
            .context(name.to_string())?;
        Ok(args[i + 1].clone())
    };
    let listen_port: i32 = arg("--listen")?.rsplit(':').next().unwrap_or("").parse()?;

    // Exposure: metrics and probes on the pod address (the node's, with
    // hostNetwork), not a wildcard; the API is left on loopback.
    assert_eq!(arg("--listen")?, format!("[$(POD_IP)]:{listen_port}"));
    let env_pod_ip = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_IP")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(env_pod_ip.as_deref(), Some("status.podIP"));
    assert!(
        !args.iter().any(|a| a.starts_with("--api-listen")),
        "the API stays on loopback: {args:?}"
    );
    // The agent takes the address as the kubelet expands it, for a pod of
    // either family (it then stops at the missing config file).
    for pod_ip in ["10.0.0.5", "fd00::5"] {
        let listen = format!("[{pod_ip}]:{listen_port}");
        let out = Command::new(sluice_bin())
            .args([
                "run",
                "--config",
                "/nonexistent/sluice.yaml",
                "--listen",
                &listen,
            ])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("/nonexistent/sluice.yaml") && !stderr.contains("--listen"),
            "--listen {listen}: {stderr}"
        );
    }
    let config_path = arg("--config")?;

    // The config it mounts validates (`sluice check`, the real parser).
    let cm: ConfigMap = typed(
        docs.iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "sluice-config")
            .context("sluice-config")?,
    )?;
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "config")
        .context("config mount")?;
    let file = Path::new(&config_path)
        .strip_prefix(&mount.mount_path)
        .context("--config is not in the config volume")?;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(file.to_str().unwrap_or("")))
        .context("the ConfigMap lacks the --config file")?;
    let dir = TempDir::new("deploy")?;
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let check = Command::new(sluice_bin())
        .args(["check", "--config"])
        .arg(dir.path("sluice.yaml"))
        .output()?;
    assert!(
        check.status.success(),
        "the shipped config is refused: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Ports and probes are the agent's.
    let port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"));
    assert_eq!(port.map(|p| p.container_port), Some(listen_port));
    let probe = |p: Option<&k8s_openapi::api::core::v1::Probe>| -> Result<(String, Value)> {
        let get = p
            .and_then(|p| p.http_get.as_ref())
            .context("httpGet probe")?;
        Ok((
            get.path.clone().unwrap_or_default(),
            serde_json::to_value(&get.port)?,
        ))
    };
    assert_eq!(
        probe(c.readiness_probe.as_ref())?,
        ("/readyz".to_string(), Value::from(listen_port))
    );
    assert_eq!(
        probe(c.liveness_probe.as_ref())?,
        ("/healthz".to_string(), Value::from(listen_port))
    );
    let svc: Service = typed(find(&docs, "Service")?)?;
    let svc_spec = svc.spec.clone().context("service spec")?;
    let svc_port = &svc_spec.ports.clone().context("ports")?[0];
    assert_eq!(svc_port.port, listen_port);
    assert_eq!(
        serde_json::to_value(&svc_port.target_port)?,
        Value::from("metrics")
    );
    let sm = find(&docs, "ServiceMonitor")?;
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    // It selects the metrics Service, whose selector picks the agent pods.
    let svc_labels = serde_json::to_value(&svc.metadata.labels)?;
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("ServiceMonitor matchLabels")?
    {
        assert_eq!(&svc_labels[k], v, "ServiceMonitor selects {k}={v}");
    }

    // The dashboard ConfigMap is the Grafana dashboard file.
    let dash = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "sluice-grafana-dashboard")
        .context("dashboard ConfigMap")?;
    let file = std::fs::read_to_string(repo("deploy/grafana/sluice-dashboard.json"))?;
    assert_eq!(
        dash["data"]["sluice-dashboard.json"]
            .as_str()
            .map(str::trim_end),
        Some(file.trim_end())
    );
    Ok(())
}

/// The least privilege the DaemonSet (plain or rendered) runs with: the
/// agent as root's uid with every capability dropped but exactly CAP_BPF,
/// CAP_NET_ADMIN and CAP_PERFMON (tests/tests/privilege.rs shows it runs
/// with these and not without any one of them), no privilege escalation, a
/// read-only root filesystem, the runtime's default seccomp profile; the
/// init container a busybox that only mounts bpffs, mode 0700.
fn assert_least_privilege(ds: &DaemonSet) -> Result<()> {
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("pod spec")?;
    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == "sluice")
        .context("sluice container")?;
    let sc = agent
        .security_context
        .as_ref()
        .context("the agent has no securityContext")?;
    let caps = sc.capabilities.as_ref().context("capabilities")?;
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(
        caps.add.as_deref(),
        Some(&["BPF".to_string(), "NET_ADMIN".into(), "PERFMON".into()][..])
    );
    assert_eq!(sc.privileged, None, "the agent is not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_user, Some(0), "root's uid: the pins are root's");
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    // No pod-level setting undoes the container's.
    if let Some(psc) = &pod.security_context {
        assert!(
            psc.seccomp_profile
                .as_ref()
                .is_none_or(|p| p.type_ == "RuntimeDefault"),
            "pod seccompProfile {:?}",
            psc.seccomp_profile
        );
    }

    let inits = pod.init_containers.as_deref().unwrap_or_default();
    assert_eq!(inits.len(), 1, "one init container: the bpffs mount");
    let init = &inits[0];
    let image = init.image.as_deref().unwrap_or("");
    assert!(
        image.starts_with("busybox:"),
        "the init container is a busybox, not the agent's image: {image}"
    );
    let command = init.command.clone().unwrap_or_default().join(" ");
    assert!(
        command.contains("mount -t bpf -o mode=0700,nosuid,nodev,noexec bpf /sys/fs/bpf"),
        "the init container mounts bpffs mode 0700: {command}"
    );
    assert!(init.args.is_none(), "the init container does nothing else");
    let mounts: Vec<_> = init
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_propagation.as_deref()))
        .collect();
    assert_eq!(
        mounts,
        [("bpffs", Some("Bidirectional"))],
        "the init container sees bpffs alone"
    );
    let isc = init
        .security_context
        .as_ref()
        .context("init securityContext")?;
    // Bidirectional propagation is allowed privileged containers only.
    assert_eq!(isc.privileged, Some(true));
    assert_eq!(isc.read_only_root_filesystem, Some(true));
    Ok(())
}

/// ConfigMap data holding YAML or JSON compares by content, not layout.
fn normalise(mut doc: Value) -> Result<Value> {
    if doc["kind"] == "ConfigMap"
        && let Some(data) = doc["data"].as_object_mut()
    {
        for v in data.values_mut() {
            if let Some(text) = v.as_str() {
                let parsed: serde_yaml::Value = serde_yaml::from_str(text)?;
                *v = serde_json::to_value(parsed)?;
            }
        }
    }
    Ok(doc)
}

#[test]
fn helm_chart_defaults_render_to_the_plain_manifests() -> Result<()> {
    let chart = repo("deploy/helm/sluice");
    let rendered = helm::render(
        &chart,
        &helm::Release {
            name: "sluice",
            namespace: "sluice-system",
        },
    )?;
    let mut from_chart: Vec<Value> = documents(&rendered)
        .with_context(|| format!("the rendered chart is not YAML:\n{rendered}"))?
        .into_iter()
        .map(normalise)
        .collect::<Result<_>>()?;
    // The chart leaves the namespace to `helm install --create-namespace`,
    // and the ServiceMonitor off by default (it needs the operator's CRDs).
    let mut plain: Vec<Value> = plain_manifests()?
        .into_iter()
        .filter(|d| d["kind"] != "Namespace" && d["kind"] != "ServiceMonitor")
        .map(normalise)
        .collect::<Result<_>>()?;
    let key = |d: &Value| format!("{}/{}", d["kind"], d["metadata"]["name"]);
    from_chart.sort_by_key(key);
    plain.sort_by_key(key);
    assert_eq!(
        from_chart.iter().map(key).collect::<Vec<_>>(),
        plain.iter().map(key).collect::<Vec<_>>()
    );
    for (c, p) in from_chart.iter().zip(&plain) {
        assert_eq!(
            c,
            p,
            "{} differs between the chart and the manifests",
            key(p)
        );
    }
    // The rendered chart runs with least privilege by default.
    let ds: DaemonSet = typed(find(&from_chart, "DaemonSet")?)?;
    assert_least_privilege(&ds)?;
    // The chart's own copy of the dashboard is the file.
    assert_eq!(
        std::fs::read_to_string(chart.join("dashboards/sluice-dashboard.json"))?,
        std::fs::read_to_string(repo("deploy/grafana/sluice-dashboard.json"))?
    );
    // The privileged option swaps the capabilities for privileged mode; the
    // ServiceMonitor, enabled, is the plain one.
    let values = std::fs::read_to_string(chart.join("values.yaml"))?;
    let dir = TempDir::new("chart")?;
    let copy = dir.path("sluice");
    copy_dir(&chart, &copy)?;
    std::fs::write(
        copy.join("values.yaml"),
        values
            .replace("privileged: false", "privileged: true")
            .replace(
                "serviceMonitor:\n  enabled: false",
                "serviceMonitor:\n  enabled: true",
            ),
    )?;
    let rendered = helm::render(
        &copy,
        &helm::Release {
            name: "sluice",
            namespace: "sluice-system",
        },
    )?;
    let docs = documents(&rendered)?;
    let plain = plain_manifests()?;
    assert_eq!(
        find(&docs, "ServiceMonitor")?,
        find(&plain, "ServiceMonitor")?
    );
    let ds: DaemonSet = typed(find(&docs, "DaemonSet")?)?;
    let c = &ds
        .spec
        .context("spec")?
        .template
        .spec
        .context("pod")?
        .containers[0];
    let sc = c.security_context.as_ref().context("securityContext")?;
    assert_eq!(sc.privileged, Some(true));
    assert!(sc.capabilities.is_none());
    // Kubernetes refuses privileged with allowPrivilegeEscalation false.
    assert_eq!(sc.allow_privilege_escalation, None);
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn dockerfile_is_multi_stage_and_runs_the_agent() -> Result<()> {
    let text = std::fs::read_to_string(repo("Dockerfile"))?;
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].ends_with(" AS build"));
    assert!(text.contains("COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice"));
    assert!(
        text.contains("bpf-linker@0.10.3"),
        "the linker the build uses"
    );
    assert!(text.contains(r#"ENTRYPOINT ["/usr/local/bin/sluice"]"#));
    Ok(())
}
