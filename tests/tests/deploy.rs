//! The deployment: the plain manifests, the Helm chart (rendered and linted
//! by real Helm, tests/src/helm.rs), the alert rules, the Grafana dashboard
//! and the systemd unit.
//!
//! - Every manifest parses as its k8s-openapi type with no field lost; the
//!   DaemonSet runs the real CLI with arguments it accepts and a config it
//!   validates; ports and probe paths match the agent's; RBAC is read-only
//!   on Services and EndpointSlices.
//! - `kubectl apply -f deploy/kubernetes/` works on a fresh cluster: files
//!   apply in name order, the Namespace (with its Pod Security labels)
//!   first, nothing that needs a CRD outside prometheus-operator/. (kubectl
//!   can't dry-run without an API server, so the order is checked here.)
//! - The chart's defaults render to the plain manifests but for Helm's own
//!   labels; two releases share no object or selector; values show up where
//!   they should; values.schema.json refuses bad values; `helm lint
//!   --strict` is clean.
//! - The alert rules pass `promtool test rules` (each alert fires once, not
//!   once per node), and each has a runbook; the dashboard filters by job
//!   and service; copies embedded in manifests and chart are the files.
//! - The systemd unit passes `systemd-analyze verify` and runs the real CLI.

use std::{
    collections::BTreeSet,
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
use serde_json::{Value, json};
use sluice_tests::{TempDir, helm, sluice_bin};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(repo(path)).with_context(|| path.to_string())
}

/// Every document of a multi-document YAML text, as JSON values.
fn documents(text: &str) -> Result<Vec<Value>> {
    Ok(serde_saphyr::from_multiple(text)?)
}

/// The YAML files of a folder (not its subfolders), in name order: the
/// order `kubectl apply -f DIR` applies them in.
fn yaml_files(dir: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

fn manifests_in(dir: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for f in yaml_files(dir)? {
        out.extend(
            documents(&std::fs::read_to_string(&f)?).with_context(|| f.display().to_string())?,
        );
    }
    Ok(out)
}

/// What `kubectl apply -f deploy/kubernetes/` applies.
fn plain_manifests() -> Result<Vec<Value>> {
    manifests_in("deploy/kubernetes")
}

/// The Prometheus Operator's objects (they need its CRDs).
fn operator_manifests() -> Result<Vec<Value>> {
    manifests_in("deploy/kubernetes/prometheus-operator")
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

/// Every object parses as its Kubernetes type (the Prometheus Operator's,
/// CRDs with no type here, are checked field by field by the tests).
fn check_types(docs: &[Value]) -> Result<()> {
    for d in docs {
        match d["kind"].as_str().unwrap_or("") {
            "Namespace" => drop(typed::<Namespace>(d)?),
            "ServiceAccount" => drop(typed::<ServiceAccount>(d)?),
            "ClusterRole" => drop(typed::<ClusterRole>(d)?),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(d)?),
            "ConfigMap" => drop(typed::<ConfigMap>(d)?),
            "DaemonSet" => drop(typed::<DaemonSet>(d)?),
            "Service" => drop(typed::<Service>(d)?),
            "ServiceMonitor" | "PrometheusRule" => {
                assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1");
            }
            other => bail!("unexpected kind {other}"),
        }
    }
    Ok(())
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("no {kind} in the manifests"))
}

fn key(d: &Value) -> String {
    format!(
        "{}/{}",
        d["kind"].as_str().unwrap_or(""),
        d["metadata"]["name"].as_str().unwrap_or("")
    )
}

#[test]
fn manifests_parse_as_kubernetes_types_and_match_the_agent() -> Result<()> {
    let docs = plain_manifests()?;
    let mut kinds = Vec::new();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or("");
        if kind == "ServiceMonitor" || kind == "PrometheusRule" {
            bail!("{kind} needs the Prometheus Operator's CRDs: it goes in prometheus-operator/");
        }
        kinds.push(kind.to_string());
    }
    check_types(&docs)?;
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
    // Interfaces by fleet-wide selection: a node whose devices are named
    // ens5 or enp0s3 must not crash-loop on a missing eth0.
    let config: Value = serde_saphyr::from_str(text)?;
    assert_eq!(
        config["interfaces"],
        serde_json::json!([{"name": "auto"}]),
        "the shipped config attaches to `auto`"
    );
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
    let operator = operator_manifests()?;
    let sm = find(&operator, "ServiceMonitor")?;
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

#[test]
fn manifests_apply_in_file_order_on_a_fresh_cluster() -> Result<()> {
    let files = yaml_files("deploy/kubernetes")?;
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap_or_default().to_string_lossy().into())
        .collect();
    assert_eq!(names[0], "00-namespace.yaml", "{names:?}");

    // The Namespace, alone in the first file, with Pod Security labels that
    // admit the privileged init container.
    let first = documents(&std::fs::read_to_string(&files[0])?)?;
    assert_eq!(first.len(), 1);
    let ns: Namespace = typed(&first[0])?;
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    for mode in ["enforce", "audit", "warn"] {
        assert_eq!(
            labels
                .get(&format!("pod-security.kubernetes.io/{mode}"))
                .map(String::as_str),
            Some("privileged"),
            "pod-security.kubernetes.io/{mode}"
        );
    }
    let namespace = ns.metadata.name.clone().context("namespace name")?;

    // Applied in name order, everything finds what it needs already there:
    // its namespace, and for the DaemonSet its ServiceAccount and ConfigMap.
    let mut applied: Vec<String> = vec![key(&first[0])];
    for f in &files[1..] {
        for d in documents(&std::fs::read_to_string(f)?)? {
            let what = format!("{} in {}", key(&d), f.display());
            assert!(
                !d["apiVersion"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("monitoring.coreos.com"),
                "{what} needs the Prometheus Operator's CRDs: it belongs in prometheus-operator/"
            );
            let cluster_scoped = matches!(
                d["kind"].as_str(),
                Some("ClusterRole" | "ClusterRoleBinding" | "Namespace")
            );
            if !cluster_scoped {
                assert_eq!(d["metadata"]["namespace"], namespace.as_str(), "{what}");
            }
            if d["kind"] == "DaemonSet" {
                let ds: DaemonSet = typed(&d)?;
                let pod = ds.spec.and_then(|s| s.template.spec).context("pod spec")?;
                let sa = pod.service_account_name.context("serviceAccountName")?;
                assert!(
                    applied.contains(&format!("ServiceAccount/{sa}")),
                    "{what}: ServiceAccount {sa} is applied after it"
                );
                for v in pod.volumes.iter().flatten() {
                    if let Some(cm) = &v.config_map {
                        assert!(
                            applied.contains(&format!("ConfigMap/{}", cm.name)),
                            "{what}: ConfigMap {} is applied after it",
                            cm.name
                        );
                    }
                }
            }
            applied.push(key(&d));
        }
    }

    // The operator's objects: a ServiceMonitor, and the alert rules verbatim.
    let operator = operator_manifests()?;
    check_types(&operator)?;
    let mut kinds: Vec<&str> = operator.iter().filter_map(|d| d["kind"].as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, ["PrometheusRule", "ServiceMonitor"]);
    let rules: Value = serde_saphyr::from_str(&read("deploy/prometheus/sluice-alerts.yaml")?)?;
    assert_eq!(find(&operator, "PrometheusRule")?["spec"], rules);
    for d in &operator {
        assert_eq!(d["metadata"]["namespace"], namespace.as_str(), "{}", key(d));
    }

    // Where the image comes from is said where it is named.
    let ds = read("deploy/kubernetes/daemonset.yaml")?;
    assert!(
        ds.contains("Nobody publishes this image yet") && ds.contains("Dockerfile"),
        "daemonset.yaml says how to get the image"
    );
    Ok(())
}

const CHART: &str = "deploy/helm/sluice";

/// Labels only Helm sets (which chart and who manages the object): left
/// out of the plain manifests, which are nobody's release.
const HELM_ONLY_LABELS: [&str; 2] = ["helm.sh/chart", "app.kubernetes.io/managed-by"];

/// ConfigMap data holding YAML or JSON compares by content, not layout;
/// Helm's own labels are dropped.
fn normalise(mut doc: Value) -> Result<Value> {
    for at in ["/metadata/labels", "/spec/template/metadata/labels"] {
        if let Some(labels) = doc.pointer_mut(at).and_then(Value::as_object_mut) {
            for l in HELM_ONLY_LABELS {
                labels.remove(l);
            }
        }
    }
    if doc["kind"] == "ConfigMap"
        && let Some(data) = doc["data"].as_object_mut()
    {
        for v in data.values_mut() {
            if let Some(text) = v.as_str() {
                *v = serde_saphyr::from_str(text)?;
            }
        }
    }
    Ok(doc)
}

fn render(release: &str, values: Value) -> Result<Vec<Value>> {
    let docs = helm::template(
        &repo(CHART),
        &helm::Release {
            name: release,
            namespace: "sluice-system",
        },
        &values,
    )?;
    let docs: Vec<Value> = docs.into_iter().map(|(_, d)| d).collect();
    check_types(&docs)?;
    Ok(docs)
}

fn daemonset(docs: &[Value]) -> Result<DaemonSet> {
    typed(find(docs, "DaemonSet")?)
}

fn agent_container(ds: &DaemonSet) -> Result<k8s_openapi::api::core::v1::Container> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.iter().find(|c| c.name == "sluice"))
        .cloned()
        .context("the sluice container")
}

#[test]
fn helm_chart_defaults_render_to_the_plain_manifests() -> Result<()> {
    eprintln!("rendering with Helm {}", helm::version()?);
    let from_chart = render("sluice", json!({}))?;
    let mut from_chart: Vec<Value> = from_chart
        .into_iter()
        .map(normalise)
        .collect::<Result<_>>()?;
    // The chart leaves the namespace to the operator (README: labelled for
    // Pod Security before `helm install`).
    let mut plain: Vec<Value> = plain_manifests()?
        .into_iter()
        .filter(|d| d["kind"] != "Namespace")
        .map(normalise)
        .collect::<Result<_>>()?;
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
    // The rendered chart runs with least privilege by default, and carries
    // the standard labels.
    let rendered = render("sluice", json!({}))?;
    let ds = daemonset(&rendered)?;
    assert_least_privilege(&ds)?;
    for d in &rendered {
        let labels = &d["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{}", key(d));
        assert_eq!(labels["helm.sh/chart"], "sluice-0.1.0", "{}", key(d));
        assert_eq!(labels["app.kubernetes.io/instance"], "sluice", "{}", key(d));
    }
    // The image: the chart's appVersion as the tag.
    assert_eq!(
        agent_container(&ds)?.image.as_deref(),
        Some("ghcr.io/sluice-lb/sluice:0.1.0")
    );

    // The chart's copies are the files.
    assert_eq!(
        read("deploy/helm/sluice/dashboards/sluice-dashboard.json")?,
        read("deploy/grafana/sluice-dashboard.json")?
    );
    assert_eq!(
        read("deploy/helm/sluice/alerts/sluice-alerts.yaml")?,
        read("deploy/prometheus/sluice-alerts.yaml")?
    );

    // Enabled, the operator's objects are the plain ones.
    let docs: Vec<Value> = render(
        "sluice",
        json!({"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true}}),
    )?
    .into_iter()
    .map(normalise)
    .collect::<Result<_>>()?;
    let operator: Vec<Value> = operator_manifests()?
        .into_iter()
        .map(normalise)
        .collect::<Result<_>>()?;
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert_eq!(find(&docs, kind)?, find(&operator, kind)?, "{kind}");
    }

    // The privileged option swaps the capabilities for privileged mode.
    let docs = render("sluice", json!({"privileged": true}))?;
    let c = agent_container(&daemonset(&docs)?)?;
    let sc = c.security_context.as_ref().context("securityContext")?;
    assert_eq!(sc.privileged, Some(true));
    assert!(sc.capabilities.is_none());
    // Kubernetes refuses privileged with allowPrivilegeEscalation false.
    assert_eq!(sc.allow_privilege_escalation, None);
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    Ok(())
}

#[test]
fn helm_lint_strict_is_clean() -> Result<()> {
    let chart = repo(CHART);
    for values in [
        json!({}),
        json!({"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true}}),
    ] {
        let findings = helm::lint(&chart, "sluice-system", &values)?;
        // Severity 1 is information ("icon is recommended"): no icon exists.
        let serious: Vec<_> = findings.iter().filter(|f| f.severity >= 2).collect();
        assert!(
            serious.is_empty(),
            "helm lint --strict {values}: {serious:#?}"
        );
    }
    // Lint runs the schema too: a bad value is an error.
    let findings = helm::lint(&chart, "sluice-system", &json!({"port": "http"}))?;
    assert!(
        findings
            .iter()
            .any(|f| f.severity == 3 && f.message.contains("/port")),
        "{findings:#?}"
    );
    Ok(())
}

/// Does `selector` (matchLabels) pick an object with `labels`?
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

#[test]
fn two_releases_share_no_object_or_selector() -> Result<()> {
    let on = json!({"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true}});
    let a = render("sluice-zone-a", on.clone())?;
    let b = render("edge", on)?;
    // Named after the release: "sluice-zone-a" contains the chart's name,
    // "edge" gets it appended.
    assert_eq!(find(&a, "DaemonSet")?["metadata"]["name"], "sluice-zone-a");
    assert_eq!(find(&b, "DaemonSet")?["metadata"]["name"], "edge-sluice");
    let keys = |docs: &[Value]| docs.iter().map(key).collect::<BTreeSet<_>>();
    let shared: Vec<_> = keys(&a).intersection(&keys(&b)).cloned().collect();
    assert!(shared.is_empty(), "both releases create {shared:?}");

    for (mine, theirs) in [(&a, &b), (&b, &a)] {
        let ds = find(mine, "DaemonSet")?;
        let selector = &ds["spec"]["selector"]["matchLabels"];
        let own_pods = &ds["spec"]["template"]["metadata"]["labels"];
        let their_pods = &find(theirs, "DaemonSet")?["spec"]["template"]["metadata"]["labels"];
        assert!(selects(selector, own_pods), "{selector} picks its pods");
        assert!(
            !selects(selector, their_pods),
            "{selector} picks the other release's pods"
        );
        let svc = find(mine, "Service")?;
        assert!(selects(&svc["spec"]["selector"], own_pods));
        assert!(!selects(&svc["spec"]["selector"], their_pods));
        let sm = find(mine, "ServiceMonitor")?;
        let sm_selector = &sm["spec"]["selector"]["matchLabels"];
        assert!(selects(sm_selector, &svc["metadata"]["labels"]));
        let their_svc = find(theirs, "Service")?;
        assert!(!selects(sm_selector, &their_svc["metadata"]["labels"]));
        // Each binding grants its own ServiceAccount its own role; each pod
        // mounts its own config.
        let crb = find(mine, "ClusterRoleBinding")?;
        assert_eq!(
            crb["roleRef"]["name"],
            find(mine, "ClusterRole")?["metadata"]["name"]
        );
        assert_eq!(
            crb["subjects"][0]["name"],
            find(mine, "ServiceAccount")?["metadata"]["name"]
        );
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(
            pod["serviceAccountName"],
            find(mine, "ServiceAccount")?["metadata"]["name"]
        );
        let config = find(mine, "ConfigMap")?["metadata"]["name"].clone();
        assert!(
            pod["volumes"]
                .as_array()
                .context("volumes")?
                .iter()
                .any(|v| v["configMap"]["name"] == config),
            "the pods mount {config}"
        );
    }
    Ok(())
}

#[test]
fn chart_values_show_up_in_the_daemonset() -> Result<()> {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let zone_affinity = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{
            "key": "node.kubernetes.io/instance-type", "operator": "NotIn", "values": ["t3.micro"]}]}]}}});
    let values = json!({
        "image": {"repository": "registry.example.com/sluice", "digest": digest},
        "nodeSelector": {"topology.kubernetes.io/zone": "eu-west-1a"},
        "affinity": zone_affinity,
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "lb", "effect": "NoSchedule"}],
        "priorityClassName": "lb-critical",
        "podAnnotations": {"example.com/team": "net"},
        "podLabels": {"example.com/tier": "edge"},
        "extraEnv": [{"name": "NODE_ZONE", "value": "eu-west-1a"}],
        "extraArgs": ["--max-connections", "512"],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
        "serviceMonitor": {"enabled": true, "labels": {"release": "kps"}, "interval": "30s"},
        "prometheusRule": {"enabled": true, "labels": {"release": "kps"},
                           "runbookBaseURL": "https://wiki.example.com/sluice/"},
        "grafanaDashboard": {"enabled": false},
    });
    let docs = render("sluice", values)?;
    let ds = daemonset(&docs)?;
    let spec = ds.spec.as_ref().context("spec")?;
    let pod = spec.template.spec.as_ref().context("pod spec")?;
    let c = agent_container(&ds)?;
    assert_eq!(
        c.image.as_deref(),
        Some(format!("registry.example.com/sluice@{digest}").as_str()),
        "a digest pins the image"
    );
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|n| n.get("topology.kubernetes.io/zone"))
            .map(String::as_str),
        Some("eu-west-1a")
    );
    assert_eq!(serde_json::to_value(&pod.affinity)?, zone_affinity);
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert_eq!(
        tolerations.len(),
        1,
        "the given tolerations replace the default"
    );
    assert_eq!(tolerations[0].key.as_deref(), Some("dedicated"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("lb-critical"));
    let meta = spec.template.metadata.as_ref().context("pod metadata")?;
    assert_eq!(
        meta.annotations
            .as_ref()
            .and_then(|a| a.get("example.com/team"))
            .map(String::as_str),
        Some("net")
    );
    let pod_labels = meta.labels.clone().unwrap_or_default();
    assert_eq!(
        pod_labels.get("example.com/tier").map(String::as_str),
        Some("edge")
    );
    // Extra pod labels don't reach the selector (it can't change later).
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(!selector.contains_key("example.com/tier"));
    let env: Vec<(String, Option<String>)> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    assert!(
        env.contains(&("NODE_ZONE".into(), Some("eu-west-1a".into()))),
        "{env:?}"
    );
    assert!(
        env.iter().any(|(n, _)| n == "POD_IP"),
        "extraEnv adds, not replaces"
    );
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(&args[args.len() - 2..], ["--max-connections", "512"]);
    // The real CLI takes them: every flag is one `sluice run` has.
    let help = Command::new(sluice_bin())
        .args(["run", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "`sluice run` has no {flag}");
    }
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .context("requests")?;
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("250m"));
    let strategy = serde_json::to_value(&spec.update_strategy)?;
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], "10%");

    let sm = find(&docs, "ServiceMonitor")?;
    assert_eq!(sm["metadata"]["labels"]["release"], "kps");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "30s");
    let rule = find(&docs, "PrometheusRule")?;
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    for r in rule["spec"]["groups"][0]["rules"]
        .as_array()
        .context("rules")?
    {
        let url = r["annotations"]["runbook_url"].as_str().unwrap_or("");
        let anchor = r["alert"].as_str().unwrap_or("").to_lowercase();
        assert_eq!(
            url,
            format!("https://wiki.example.com/sluice/runbooks.md#{anchor}")
        );
    }
    assert!(
        docs.iter()
            .all(|d| d["metadata"]["name"] != "sluice-grafana-dashboard"),
        "grafanaDashboard.enabled=false leaves the dashboard out"
    );

    // NOTES.txt names the release's DaemonSet, and warns about the default
    // image only when it is the unpublished default.
    let chart = repo(CHART);
    let release = helm::Release {
        name: "sluice",
        namespace: "sluice-system",
    };
    let notes = helm::notes(&chart, &release, &json!({}))?;
    assert!(
        notes.contains("daemonset/sluice -n sluice-system"),
        "{notes}"
    );
    assert!(notes.contains("nobody publishes"), "{notes}");
    let notes = helm::notes(
        &chart,
        &release,
        &json!({"image": {"repository": "registry.example.com/sluice"}}),
    )?;
    assert!(!notes.contains("nobody publishes"), "{notes}");
    Ok(())
}

#[test]
fn chart_schema_refuses_bad_values_naming_them() -> Result<()> {
    for (values, named) in [
        (json!({"port": "http"}), "/port"),
        (json!({"port": 70000}), "/port"),
        (json!({"image": {"digest": "latest"}}), "/image/digest"),
        (
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
        ),
        (json!({"nodeSelecter": {"zone": "a"}}), "nodeSelecter"),
        (json!({"nodeSelector": {"zone": 1}}), "/nodeSelector/zone"),
        (json!({"extraEnv": [{"value": "x"}]}), "/extraEnv/0"),
        (json!({"extraArgs": "--max-connections 512"}), "/extraArgs"),
        (
            json!({"serviceMonitor": {"enabled": "yes"}}),
            "/serviceMonitor/enabled",
        ),
        (
            json!({"serviceMonitor": {"interval": "15 seconds"}}),
            "/serviceMonitor/interval",
        ),
        (
            json!({"prometheusRule": {"runbookBaseURL": "https://wiki.example.com/\"x"}}),
            "/prometheusRule/runbookBaseURL",
        ),
        (
            json!({"updateStrategy": {"type": "Recreate"}}),
            "/updateStrategy/type",
        ),
    ] {
        match render("sluice", values.clone()) {
            Ok(_) => bail!("values {values} rendered"),
            Err(e) => {
                let e = format!("{e:#}");
                assert!(
                    e.contains(named),
                    "values {values}: the error names {named}: {e}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn alert_rules_fire_once_per_problem_with_runbooks() -> Result<()> {
    // promtool's unit tests: each alert fires when it should (once for a
    // backend failing on every node), and not before its `for`.
    let out = Command::new("promtool")
        .args(["test", "rules", "sluice-alerts.test.yaml"])
        .current_dir(repo("deploy/prometheus"))
        .output()
        .context("promtool (Debian package prometheus)")?;
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let rules: Value = serde_saphyr::from_str(&read("deploy/prometheus/sluice-alerts.yaml")?)?;
    let tests: Value = serde_saphyr::from_str(&read("deploy/prometheus/sluice-alerts.test.yaml")?)?;
    let tested: BTreeSet<&str> = tests["tests"]
        .as_array()
        .context("tests")?
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|a| a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|a| a["alertname"].as_str())
        .collect();
    let runbooks = read("docs/runbooks.md")?;
    let mut names = Vec::new();
    for rule in rules["groups"][0]["rules"].as_array().context("rules")? {
        let name = rule["alert"].as_str().context("alert name")?;
        names.push(name);
        assert!(
            tested.contains(name),
            "{name}: no promtool test makes it fire"
        );
        assert!(rule["for"].is_string(), "{name} has no `for`");
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{name}: severity"
        );
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        assert_eq!(
            url,
            format!("docs/runbooks.md#{}", name.to_lowercase()),
            "{name}: runbook_url"
        );
        // The runbook: a heading with the alert's name (its anchor), saying
        // what it means, how to confirm it and what to do.
        let section = runbooks
            .split("\n## ")
            .find(|s| s.lines().next() == Some(name))
            .with_context(|| format!("docs/runbooks.md has no `## {name}`"))?;
        for part in ["**Meaning.**", "**Confirm.**", "**Act"] {
            assert!(section.contains(part), "runbook {name} lacks {part}");
        }
        assert!(
            section.contains("sluice "),
            "runbook {name} names no operator command"
        );
    }
    for name in [
        "SluiceAgentDown",
        "SluicePacketsDropped",
        "SluiceDiscoveryHeldBack",
        "SluiceEventsDropped",
    ] {
        assert!(names.contains(&name), "no {name} alert");
    }
    Ok(())
}

/// Metrics whose series carry a `service` label.
fn per_service(expr: &str) -> bool {
    [
        "sluice_service_",
        "sluice_backend_",
        "sluice_connection_retries",
        "sluice_discovery_",
    ]
    .iter()
    .any(|m| expr.contains(m))
}

#[test]
fn dashboard_filters_by_job_and_service_with_units() -> Result<()> {
    let dash: Value = serde_json::from_str(&read("deploy/grafana/sluice-dashboard.json")?)?;
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .context("templating")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance", "service"]);
    for panel in dash["panels"].as_array().context("panels")? {
        let title = panel["title"].as_str().unwrap_or("");
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or("");
        for target in panel["targets"].as_array().context("targets")? {
            let expr = target["expr"].as_str().context("expr")?;
            // Every selector, process_* included, is this job's and agent's.
            let selectors = expr.matches('{').count();
            assert_eq!(
                expr.matches(r#"job=~"$job", instance=~"$instance""#)
                    .count(),
                selectors,
                "{title}: {expr}"
            );
            if per_service(expr) {
                assert_eq!(
                    expr.matches(r#"service=~"$service""#).count(),
                    selectors,
                    "{title}: {expr}"
                );
            }
        }
        let expected = if title.contains("latency") {
            "s"
        } else if title.contains("memory") {
            "bytes"
        } else if title.starts_with("Traffic") {
            "bps"
        } else if title.contains("per second") || title.contains("events") {
            "cps"
        } else if title.starts_with("Packets") {
            "pps"
        } else {
            unit
        };
        assert_eq!(unit, expected, "{title}");
    }
    // The manifests' copy is the file.
    let cm = plain_manifests()?
        .into_iter()
        .find(|d| d["metadata"]["name"] == "sluice-grafana-dashboard")
        .context("the dashboard ConfigMap")?;
    let embedded: Value = serde_json::from_str(
        cm["data"]["sluice-dashboard.json"]
            .as_str()
            .context("dashboard data")?,
    )?;
    assert_eq!(embedded, dash);
    Ok(())
}

/// `KEY=VALUE` lines of the unit, in order.
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn systemd_unit_verifies_and_runs_the_real_cli() -> Result<()> {
    let text = read("deploy/systemd/sluice.service")?;
    let settings = unit_settings(&text);
    let get = |k: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let exec = get("ExecStart");
    assert_eq!(exec.len(), 1);
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(
        argv,
        [
            "/usr/local/bin/sluice",
            "run",
            "--config",
            "/etc/sluice/sluice.yaml"
        ]
    );

    // systemd's own check, with the binary where ExecStart says (the one
    // built here, as it would be installed): no warning, no error.
    let dir = TempDir::new("systemd")?;
    let unit = dir.path("sluice.service");
    std::fs::write(
        &unit,
        text.replace("/usr/local/bin/sluice", &sluice_bin().to_string_lossy()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .context("systemd-analyze (Debian package systemd)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );

    // The real binary takes the arguments: it stops at the config file, not
    // at an argument.
    let missing = dir.path("etc/sluice.yaml");
    let out = Command::new(sluice_bin())
        .args(&argv[1..3])
        .arg(&missing)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&*missing.to_string_lossy()), "{stderr}");
    // ... and runs on the shipped Kubernetes config, which validates.
    let cm = plain_manifests()?
        .into_iter()
        .find(|d| d["metadata"]["name"] == "sluice-config")
        .context("sluice-config")?;
    std::fs::create_dir_all(dir.path("etc"))?;
    std::fs::write(&missing, cm["data"]["sluice.yaml"].as_str().unwrap_or(""))?;
    let check = Command::new(sluice_bin())
        .args(["check", "--config"])
        .arg(&missing)
        .output()?;
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Privileges: exactly the DaemonSet's capabilities (tests/tests/privilege.rs
    // runs the agent with those and shows each is needed), pins writable.
    let ds: DaemonSet = typed(find(&plain_manifests()?, "DaemonSet")?)?;
    let mut caps: Vec<String> = agent_container(&ds)?
        .security_context
        .and_then(|s| s.capabilities)
        .and_then(|c| c.add)
        .unwrap_or_default()
        .into_iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    caps.sort();
    for k in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let mut set: Vec<String> = get(k)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(String::from)
            .collect();
        set.sort();
        assert_eq!(set, caps, "{k}");
    }
    assert_eq!(get("User"), ["root"]);
    assert_eq!(get("NoNewPrivileges"), ["yes"]);
    assert_eq!(get("ProtectSystem"), ["strict"]);
    assert!(get("ReadWritePaths").contains(&"/sys/fs/bpf"), "pins");
    assert_eq!(get("Restart"), ["on-failure"]);
    assert_eq!(
        get("RestartPreventExitStatus"),
        ["2"],
        "a refusal is not retried"
    );
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
