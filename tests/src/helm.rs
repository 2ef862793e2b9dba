//! Renders Sluice's Helm chart for the tests (no `helm` binary here). It
//! supports exactly the template subset the chart uses, and fails on
//! anything else, so the chart can't drift into what this can't check:
//!
//! - `{{ .Values.a.b }}`, `{{ .Release.Name }}`, `{{ .Release.Namespace }}`
//! - `{{ toYaml .Values.x | nindent N }}`, `{{ .Files.Get "f" | nindent N }}`
//! - `{{ if .Values.x }}`, `{{ else }}`, `{{ end }}`
//! - `{{-` / `-}}` whitespace trimming

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_yaml::Value;

pub struct Release<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
}

/// Every template of the chart at `chart`, rendered with its values.yaml,
/// as one multi-document YAML text.
pub fn render(chart: &Path, release: &Release) -> Result<String> {
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(chart.join("values.yaml"))?)?;
    let mut templates: Vec<_> = std::fs::read_dir(chart.join("templates"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    templates.sort();
    let mut out = String::new();
    for t in templates {
        let text = std::fs::read_to_string(&t)?;
        let rendered = render_one(&text, &values, release, chart)
            .with_context(|| format!("rendering {}", t.display()))?;
        out += "---\n";
        out += &rendered;
        out += "\n";
    }
    Ok(out)
}

fn lookup<'v>(values: &'v Value, path: &str) -> Result<&'v Value> {
    let mut v = values;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        v = v
            .get(part)
            .with_context(|| format!("values have no {path}"))?;
    }
    Ok(v)
}

fn scalar(v: &Value) -> Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => bail!("not a scalar: {other:?}"),
    })
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false))
        && v.as_str() != Some("")
        && v.as_sequence().is_none_or(|s| !s.is_empty())
        && v.as_mapping().is_none_or(|m| !m.is_empty())
}

fn nindent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    let body: Vec<String> = text
        .trim_end_matches('\n')
        .split('\n')
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect();
    format!("\n{}", body.join("\n"))
}

/// One `{{ … }}` action's output.
fn action(expr: &str, values: &Value, release: &Release, chart: &Path) -> Result<String> {
    let (head, pipe) = match expr.split_once('|') {
        Some((h, p)) => (h.trim(), Some(p.trim())),
        None => (expr, None),
    };
    let text = if let Some(path) = head.strip_prefix("toYaml .Values") {
        serde_yaml::to_string(lookup(values, path)?)?
    } else if let Some(file) = head.strip_prefix(".Files.Get ") {
        let file = file.trim().trim_matches('"');
        std::fs::read_to_string(chart.join(file)).with_context(|| format!("file {file}"))?
    } else if let Some(path) = head.strip_prefix(".Values") {
        scalar(lookup(values, path)?)?
    } else if head == ".Release.Name" {
        release.name.to_string()
    } else if head == ".Release.Namespace" {
        release.namespace.to_string()
    } else {
        bail!("unsupported template action {{{{ {expr} }}}}");
    };
    match pipe {
        None => Ok(text),
        Some(p) => match p.strip_prefix("nindent ") {
            Some(n) => Ok(nindent(&text, n.trim().parse()?)),
            None => bail!("unsupported pipeline | {p}"),
        },
    }
}

fn render_one(text: &str, values: &Value, release: &Release, chart: &Path) -> Result<String> {
    // (emitting, any branch taken) per open `if`.
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let mut out = String::new();
    let mut rest = text;
    let emitting = |stack: &Vec<(bool, bool)>| stack.iter().all(|(e, _)| *e);
    while let Some(start) = rest.find("{{") {
        let literal = &rest[..start];
        if emitting(&stack) {
            out += literal;
        }
        let end = rest[start..].find("}}").context("unclosed {{")? + start;
        let mut inner = &rest[start + 2..end];
        if let Some(i) = inner.strip_prefix('-') {
            inner = i;
            let trimmed = out.trim_end_matches([' ', '\t', '\n']).len();
            out.truncate(trimmed);
        }
        let trim_after = inner.ends_with('-');
        let inner = inner.trim_end_matches('-').trim();
        rest = &rest[end + 2..];
        if trim_after {
            rest = rest.trim_start_matches([' ', '\t', '\n']);
        }
        if let Some(cond) = inner.strip_prefix("if ") {
            let path = cond
                .trim()
                .strip_prefix(".Values")
                .with_context(|| format!("unsupported condition {cond}"))?;
            let yes = truthy(lookup(values, path)?);
            stack.push((yes, yes));
        } else if inner == "else" {
            let top = stack.last_mut().context("else without if")?;
            *top = (!top.1, true);
        } else if inner == "end" {
            stack.pop().context("end without if")?;
        } else if emitting(&stack) {
            out += &action(inner, values, release, chart)?;
        }
    }
    if emitting(&stack) {
        out += rest;
    }
    if !stack.is_empty() {
        bail!("if without end");
    }
    Ok(out)
}
