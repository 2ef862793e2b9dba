//! The YAML config file (see README "Configuration").
//!
//! Parsing is in two steps: serde reads the raw shape (`schema`: unknown
//! fields are refused, so a typo never silently means a default), then
//! `validate` checks what serde can't and resolves addresses (`model`).
//! Every error names the field and the value.

mod model;
mod schema;
mod validate;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

use std::path::Path;

pub use model::{DiscoverySpec, ServiceSpec, Source};
pub use schema::{DEFAULT_CONTROL_SOCKET, DEFAULT_NEW_FLOWS_PER_SECOND, DEFAULT_STATE_DIRECTORY};
pub use schema::{
    AttachMode, BackendSpec, Config, Conntrack, ConntrackTimeouts, Control, Discovery, DnsDiscovery,
    DnsRecord, EtcdDiscovery, Failure, Forwarding, Interface, KubeAddress, Kubernetes, Limits,
    Maglev, Pinning, Protocol, Service, SocketLb,
};
pub use validate::{
    BackendError, Cidr, MAX_WEIGHT, RefusedClass, backend, is_prime, refused_class,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: {field}: invalid value {value:?}: {why}")]
    Invalid {
        path: String,
        field: String,
        value: String,
        why: String,
    },
}

/// A config after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub raw: Config,
    pub services: Vec<ServiceSpec>,
}

pub fn load(path: &Path) -> Result<Validated, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

pub fn parse(text: &str, path: &str) -> Result<Validated, ConfigError> {
    let raw: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_string(),
        message: located(&e, text),
    })?;
    validate::validate(raw, path)
}

/// serde_yaml's message, made to say where the problem is when it doesn't:
/// some of its errors (a key given twice, a character YAML refuses, a file
/// that isn't a mapping) come without a line.
fn located(e: &serde_yaml::Error, text: &str) -> String {
    let message = e.to_string().replace(
        "expected struct Config",
        "expected the config's settings (interfaces:, services:, ...)",
    );
    if message.contains(" line ") {
        return message;
    }
    // "control characters are not allowed at position N" (a byte offset).
    if let Some(offset) = message
        .rsplit_once("at position ")
        .and_then(|(_, n)| n.trim().parse::<usize>().ok())
        .filter(|&n| n <= text.len() && text.is_char_boundary(n))
    {
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        return format!("{message} (line {line} column {column})");
    }
    // "duplicate field `port`": the lines that set it.
    if let Some(key) = message
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(key, _)| key)
    {
        let lines: Vec<String> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| {
                let l = l.trim_start().trim_start_matches("- ");
                l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with(':'))
            })
            .map(|(i, _)| (i + 1).to_string())
            .take(5)
            .collect();
        if !lines.is_empty() {
            return format!("{message} (set on lines {})", lines.join(", "));
        }
    }
    // More than one document: where the separators are.
    let separators: Vec<String> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("---") || l.starts_with("..."))
        .map(|(i, _)| (i + 1).to_string())
        .take(5)
        .collect();
    if message.contains("more than one document") {
        if !separators.is_empty() {
            return format!(
                "{message} (document markers on lines {})",
                separators.join(", ")
            );
        }
        // An indented first line makes YAML end the document at the first
        // line that is less indented.
        let content = |l: &&str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
        if let Some((first, indent)) = text
            .lines()
            .enumerate()
            .find(|(_, l)| content(l))
            .map(|(i, l)| (i + 1, l.len() - l.trim_start().len()))
            && indent > 0
            && let Some(less) = text
                .lines()
                .enumerate()
                .skip(first)
                .find(|(_, l)| content(l) && l.len() - l.trim_start().len() < indent)
                .map(|(i, _)| i + 1)
        {
            return format!(
                "{message} (line {first} is indented by {indent}: the top level ends at line {less}, \
                 which is indented less)"
            );
        }
    }
    // Else serde_yaml's own position (for a key given twice it is the
    // start of the mapping, hence last).
    if let Some(at) = e.location() {
        return format!("{message} at line {} column {}", at.line(), at.column());
    }
    message
}
