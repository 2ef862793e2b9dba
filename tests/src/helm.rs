//! Renders and lints Sluice's Helm chart with real Helm: Helm v4's Go SDK,
//! as the `helm-python-sdk` wheel ships it (`cargo xtask test` installs it
//! in a virtualenv; no helm binary can be fetched here). `helm_sdk.py`
//! beside this file is the bridge: what `helm template` and `helm lint`
//! do, values.schema.json validation included.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub struct Release<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
}

/// The virtualenv's Python: SLUICE_HELM_PYTHON (set by `cargo xtask
/// test`), else where xtask puts it (xtask/src/prereqs.rs).
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_HELM_PYTHON") {
        return p.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/sluice/helm-python-sdk-0.2.2/bin/python")
}

/// One request to the bridge; an `{"error": …}` answer is an Err.
fn call(request: Value) -> Result<Value> {
    let python = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/helm_sdk.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "real Helm (helm-python-sdk) is not installed: no {} \
                 (`cargo xtask setup` installs it)",
                python.display()
            )
        })?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} {}: {}",
            python.display(),
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let answer: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "helm_sdk.py answered {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    if let Some(e) = answer.get("error") {
        bail!("helm: {}", e.as_str().unwrap_or_default());
    }
    Ok(answer)
}

/// The Helm version that renders (e.g. "v4.2.3").
pub fn version() -> Result<String> {
    Ok(call(json!({"op": "version"}))?["helm"]
        .as_str()
        .context("version")?
        .to_string())
}

/// Helm's answer to a template run: every template's text, by name.
fn render(chart: &Path, release: &Release, values: &Value) -> Result<Value> {
    call(json!({
        "op": "template",
        "chart": chart,
        "name": release.name,
        "namespace": release.namespace,
        "values": values,
    }))
}

/// `helm template`: every rendered object of the chart at `chart` with
/// `values` over its values.yaml (refused as Helm refuses values that break
/// values.schema.json), as JSON, each with the template it came from.
pub fn template(chart: &Path, release: &Release, values: &Value) -> Result<Vec<(String, Value)>> {
    let answer = render(chart, release, values)?;
    let manifests = answer["manifests"].as_object().context("manifests")?;
    let mut objects = Vec::new();
    for (template, text) in manifests {
        if template.ends_with("NOTES.txt") {
            continue;
        }
        let text = text.as_str().context("manifest text")?;
        let docs: Vec<Value> = serde_saphyr::from_multiple(text)
            .with_context(|| format!("{template} rendered to invalid YAML:\n{text}"))?;
        objects.extend(docs.into_iter().map(|d| (template.clone(), d)));
    }
    Ok(objects)
}

/// The rendered NOTES.txt.
pub fn notes(chart: &Path, release: &Release, values: &Value) -> Result<String> {
    let answer = render(chart, release, values)?;
    Ok(answer["manifests"]
        .as_object()
        .context("manifests")?
        .iter()
        .find(|(k, _)| k.ends_with("NOTES.txt"))
        .and_then(|(_, v)| v.as_str())
        .context("no NOTES.txt rendered")?
        .to_string())
}

/// A `helm lint --strict` finding.
#[derive(Debug)]
pub struct Finding {
    /// 1 info, 2 warning, 3 error.
    pub severity: u64,
    pub path: String,
    pub message: String,
}

/// `helm lint --strict` with `values`.
pub fn lint(chart: &Path, namespace: &str, values: &Value) -> Result<Vec<Finding>> {
    let answer = call(json!({
        "op": "lint",
        "chart": chart,
        "namespace": namespace,
        "values": values,
    }))?;
    let report = &answer["report"];
    let mut findings: Vec<Finding> = report["messages"]
        .as_array()
        .context("lint messages")?
        .iter()
        .map(|m| Finding {
            severity: m["severity"].as_u64().unwrap_or(3),
            path: m["path"].as_str().unwrap_or_default().to_string(),
            message: m["error"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    for e in report["errors"].as_array().into_iter().flatten() {
        findings.push(Finding {
            severity: 3,
            path: String::new(),
            message: e.as_str().unwrap_or_default().to_string(),
        });
    }
    Ok(findings)
}
