//! The config file's YAML into the raw shape, with serde-saphyr (maintained,
//! pure Rust, with budgets against hostile YAML: alias bombs, deep nesting,
//! huge scalars).
//!
//! serde-saphyr says where a problem is (line and column) but not which
//! field, and for a value of the wrong type not the value: "invalid u16 at
//! line 5, column 11". Operators need "services[0].port: invalid value
//! \"70000\"", so the field's path is tracked while deserializing
//! (serde_path_to_error) and the value is cut out of the text at the
//! error's span.

use super::Config;

/// One line per error (the contract), YAML 1.2 booleans only (`probe: no`
/// or `on` is refused rather than guessed), and the parser's default budget.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
    }
}

/// Parses a config file's text; the error names the field (when the
/// problem is inside one), the value as written, and the line and column.
pub(super) fn config(text: &str) -> Result<Config, String> {
    let mut path = None;
    serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = Some(e.path().to_string());
            e.into_inner()
        })
    })
    // "." is the top level; "?" a key serde-saphyr refused before naming it.
    .map_err(|e| {
        describe(
            &e,
            path.as_deref().filter(|p| !matches!(*p, "." | "?")),
            text,
        )
    })
}

/// `FIELD: invalid value "VALUE": WHAT at line L column C`, each part when
/// known.
fn describe(e: &serde_saphyr::Error, field: Option<&str>, text: &str) -> String {
    let message = e.to_string();
    let location = e.location().filter(|l| l.line() > 0);
    // The message without serde-saphyr's location suffix (said again below,
    // after the value).
    let what = location
        .and_then(|l| {
            message.strip_suffix(&format!(" at line {}, column {}", l.line(), l.column()))
        })
        .unwrap_or(&message);
    // A value of the wrong type or form: named as written.
    let value = location
        .filter(|_| what.starts_with("invalid") || what.starts_with("expected"))
        .and_then(|l| scalar_at(text, l.span()))
        .filter(|v| !what.contains(v.as_str()));
    let what = reworded(what, field.is_none(), text);
    let mut out = String::new();
    if let Some(field) = field {
        out.push_str(field);
        out.push_str(": ");
    }
    if let Some(value) = value {
        out.push_str(&format!("invalid value {value:?}: "));
    }
    out.push_str(&what);
    if let Some(l) = location {
        out.push_str(&format!(" at line {} column {}", l.line(), l.column()));
        out.push_str(&hint(text, l.line()));
    }
    out
}

/// serde-saphyr's messages meant for the programmer, said for the operator.
fn reworded(what: &str, top_level: bool, text: &str) -> String {
    const SETTINGS: &str = "expected the config's settings (interfaces:, services:, ...)";
    if top_level && what.starts_with("expected mapping start") {
        return SETTINGS.into();
    }
    let blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if blank && what.starts_with("unexpected end of input") {
        return format!("the file is empty: {SETTINGS}");
    }
    if what.starts_with("multiple YAML documents detected") {
        let markers: Vec<String> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.starts_with("---") || l.starts_with("..."))
            .map(|(i, _)| (i + 1).to_string())
            .take(5)
            .collect();
        return format!(
            "more than one YAML document (document markers on lines {}): a config file is one, \
             the second starts",
            markers.join(", ")
        );
    }
    if let Some(key) = what
        .strip_prefix("duplicate mapping key: ")
        .and_then(|rest| rest.split(", set DuplicateKeyPolicy").next())
    {
        return format!("`{key}` is set twice, the second time");
    }
    what.replace("expected mapping start", "expected a mapping (key: value)")
        .replace("expected sequence start", "expected a list")
}

/// The scalar the error points at, as written (unquoted), when it is one
/// short line: a mapping or list is better described by its line.
fn scalar_at(text: &str, span: serde_saphyr::Span) -> Option<String> {
    let (start, len) = match (span.byte_offset(), span.byte_len()) {
        (Some(offset), Some(len)) => (offset as usize, len as usize),
        // Character offsets: turned into bytes.
        _ => {
            let mut chars = text.char_indices().map(|(i, _)| i).chain([text.len()]);
            let start = chars.nth(span.offset() as usize)?;
            let end = text[start..]
                .char_indices()
                .map(|(i, _)| start + i)
                .chain([text.len()])
                .nth(span.len() as usize)?;
            (start, end - start)
        }
    };
    let raw = text.get(start..start.checked_add(len)?)?.trim();
    let value = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .or_else(|| raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
        .unwrap_or(raw);
    let is_scalar = !value.is_empty()
        && value.len() <= 200
        && !value.contains('\n')
        && !value.starts_with(['{', '[', '#'])
        && value != "-"
        && !value.starts_with("- ");
    is_scalar.then(|| value.to_string())
}

/// For an error on a line less indented than the file's first line: YAML
/// ended the top level there (an indented first line is easy to miss).
fn hint(text: &str, error_line: u64) -> String {
    let content = |l: &&str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
    let indent = |l: &str| l.len() - l.trim_start().len();
    let Some((first, first_indent)) = text
        .lines()
        .enumerate()
        .find(|(_, l)| content(l))
        .map(|(i, l)| (i + 1, indent(l)))
    else {
        return String::new();
    };
    let less = text
        .lines()
        .enumerate()
        .skip(first)
        .find(|(_, l)| content(l) && indent(l) < first_indent)
        .map(|(i, _)| i + 1);
    match less {
        Some(less) if first_indent > 0 && less as u64 <= error_line => format!(
            " (line {first} is indented by {first_indent}: the top level ends at line {less}, \
             which is indented less)"
        ),
        _ => String::new(),
    }
}
