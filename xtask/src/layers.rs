//! The kernel programs' layering, checked by `cargo xtask lint`.
//!
//! agent-ebpf/src/main.rs declares its modules in layers: each module may use
//! only the modules declared above it. This reads that order, then every
//! module's file, collects the crate modules it names (`crate::x` anywhere in
//! code, and each top-level name of a `use crate::{...}` group, however
//! nested), and fails on any that is declared at or after the module itself.
//! Plain text handling, no Rust parser: comments and string and character
//! literals are blanked first, so only code is read. (`super::x` is not
//! followed: in a top-level module it means `crate::x`; the kernel modules
//! write `crate::`.)

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result, bail};

/// What a successful check covered.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    /// Modules declared in main.rs.
    pub modules: usize,
    /// Distinct (module, module it uses) pairs, all of them downward.
    pub imports: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kernel module layers: {} modules, {} imports of modules above, no upward import",
            self.modules, self.imports
        )
    }
}

/// Checks the crate whose root is `src/main.rs`; `shown` is how file paths
/// appear in messages (e.g. `agent-ebpf/src`).
pub fn check(src: &Path, shown: &str) -> Result<Summary> {
    let root = src.join("main.rs");
    let main =
        std::fs::read_to_string(&root).with_context(|| format!("reading {}", root.display()))?;
    check_with(&main, |name| {
        let flat = src.join(format!("{name}.rs"));
        let (path, file) = if flat.exists() {
            (flat, format!("{shown}/{name}.rs"))
        } else {
            (
                src.join(name).join("mod.rs"),
                format!("{shown}/{name}/mod.rs"),
            )
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading module {name} ({})", path.display()))?;
        Ok((file, text))
    })
}

/// The check itself, over main.rs's text and a reader of each module's file
/// (returning the path to show and the text).
pub fn check_with(
    main: &str,
    mut read_module: impl FnMut(&str) -> Result<(String, String)>,
) -> Result<Summary> {
    let order = declared_modules(main);
    if order.is_empty() {
        bail!("kernel module layers: no `mod NAME;` declaration found in main.rs");
    }
    let mut problems = Vec::new();
    let mut imports = 0;
    for (position, name) in order.iter().enumerate() {
        let (file, text) = read_module(name)?;
        // One entry per module used, at the first line naming it.
        let mut used = BTreeMap::new();
        for import in crate_imports(&text) {
            used.entry(import.name).or_insert(import.line);
        }
        for (imported, line) in used {
            match problem(&order, position, &imported) {
                Some(why) => problems.push(format!("{file}:{line}: {why}")),
                None => imports += 1,
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "kernel module layers: {} upward import{}:\n  {}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("\n  ")
        );
    }
    Ok(Summary {
        modules: order.len(),
        imports,
    })
}

/// Why module `order[position]` may not use `imported`, if it may not.
fn problem(order: &[String], position: usize, imported: &str) -> Option<String> {
    let name = &order[position];
    if imported == "*" {
        return Some(format!(
            "{name} imports crate::* (every module at once): name the modules it uses, \
             so the layers can be checked"
        ));
    }
    match order.iter().position(|m| m == imported) {
        Some(p) if p < position => None,
        Some(p) if p == position => Some(format!(
            "{name} imports itself through crate::{name}: use self:: (a stage may only use \
             those above it in main.rs)"
        )),
        Some(_) => Some(format!(
            "{name} imports {imported}, declared after it: a stage may only use those above \
             it in main.rs"
        )),
        None => Some(format!(
            "{name} imports crate::{imported}, which is not a module declared in main.rs: \
             the crate root sits below every stage, a stage may only use the modules above \
             it in main.rs"
        )),
    }
}

/// The `mod NAME;` declarations of a crate root, in order (top level only:
/// unindented lines, attributes and visibility allowed before `mod`).
pub fn declared_modules(main: &str) -> Vec<String> {
    let code = blank_comments_and_literals(main);
    let mut modules = Vec::new();
    for line in code.lines() {
        if line.starts_with(char::is_whitespace) {
            continue;
        }
        let mut rest = line.trim_end();
        // `#[cfg(...)] mod x;` on one line.
        while let Some(after) = rest.strip_prefix("#[") {
            match after.find(']') {
                Some(end) => rest = after[end + 1..].trim_start(),
                None => break,
            }
        }
        if let Some(after) = rest.strip_prefix("pub") {
            rest = after.trim_start();
            if let Some(after) = rest.strip_prefix('(') {
                rest = after.split_once(')').map_or("", |(_, r)| r).trim_start();
            }
        }
        let Some(after) = rest.strip_prefix("mod") else {
            continue;
        };
        if !after.starts_with(char::is_whitespace) {
            continue;
        }
        let Some(name) = after.trim().strip_suffix(';') else {
            continue; // `mod x { ... }`: inline, not a file of its own
        };
        let name = name.trim();
        if !name.is_empty() && name.bytes().all(is_ident) {
            modules.push(name.to_string());
        }
    }
    modules
}

/// A crate module a file names, and the (1-based) line it is named on.
#[derive(Debug, PartialEq, Eq)]
pub struct Import {
    pub name: String,
    pub line: usize,
}

/// Every `crate::NAME` in the code of `source` (NAME being `*` for a glob),
/// and every top-level NAME of a `crate::{...}` group, in order.
pub fn crate_imports(source: &str) -> Vec<Import> {
    let code = blank_comments_and_literals(source);
    let b = code.as_bytes();
    let line_of = |at: usize| 1 + b[..at].iter().filter(|&&c| c == b'\n').count();
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(offset) = code[i..].find("crate") {
        let start = i + offset;
        i = start + "crate".len();
        // A whole word, and not `$crate` (a macro's own crate).
        if start > 0 && (is_ident(b[start - 1]) || b[start - 1] == b'$') {
            continue;
        }
        if i < b.len() && is_ident(b[i]) {
            continue;
        }
        let mut j = skip_space(b, i);
        if !code[j..].starts_with("::") {
            continue; // `pub(crate)`, `extern crate`
        }
        j = skip_space(b, j + 2);
        if b.get(j) == Some(&b'{') {
            // A group: the first name of each item at depth one.
            let mut depth = 0;
            let mut item_start = true;
            while j < b.len() {
                match b[j] {
                    b'{' => {
                        depth += 1;
                        j += 1;
                    }
                    b'}' => {
                        depth -= 1;
                        j += 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => {
                        item_start = true;
                        j += 1;
                    }
                    c if depth == 1 && item_start && (is_ident(c) || c == b'*') => {
                        let end = if c == b'*' { j + 1 } else { ident_end(b, j) };
                        let name = &code[j..end];
                        if name != "self" {
                            found.push(Import {
                                name: name.to_string(),
                                line: line_of(j),
                            });
                        }
                        item_start = false;
                        j = end;
                    }
                    _ => j += 1,
                }
            }
            i = j;
        } else if b.get(j) == Some(&b'*') || b.get(j).is_some_and(|&c| is_ident(c)) {
            let end = if b[j] == b'*' { j + 1 } else { ident_end(b, j) };
            found.push(Import {
                name: code[j..end].to_string(),
                line: line_of(j),
            });
            i = end;
        }
    }
    found
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn ident_end(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && is_ident(b[j]) {
        j += 1;
    }
    j
}

fn skip_space(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && b[j].is_ascii_whitespace() {
        j += 1;
    }
    j
}

/// `source` with comments and string and character literals replaced by
/// spaces (newlines kept, so lines and byte offsets stay where they were).
fn blank_comments_and_literals(source: &str) -> String {
    let mut b = source.as_bytes().to_vec();
    let blank = |b: &mut [u8], from: usize, to: usize| {
        for c in &mut b[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let n = b.len();
    let mut i = 0;
    while i < n {
        let next = b.get(i + 1).copied();
        match b[i] {
            b'/' if next == Some(b'/') => {
                let end = b[i..].iter().position(|&c| c == b'\n').map_or(n, |p| i + p);
                blank(&mut b, i, end);
                i = end;
            }
            b'/' if next == Some(b'*') => {
                // Block comments nest.
                let (mut j, mut depth) = (i + 2, 1);
                while j < n && depth > 0 {
                    if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                blank(&mut b, i, j);
                i = j;
            }
            b'r' if raw_string_start(&b, i).is_some() => {
                let hashes = raw_string_start(&b, i).unwrap_or(0);
                // Ends at `"` followed by as many `#`.
                let closes = |j: usize| {
                    b[j] == b'"' && b[j + 1..].iter().take_while(|&&c| c == b'#').count() >= hashes
                };
                let mut j = i + 1 + hashes + 1;
                while j < n && !closes(j) {
                    j += 1;
                }
                let j = (j + 1 + hashes).min(n);
                blank(&mut b, i, j);
                i = j;
            }
            b'"' => {
                let mut j = i + 1;
                while j < n && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let j = (j + 1).min(n);
                blank(&mut b, i, j);
                i = j;
            }
            b'\'' => match char_literal_len(&b, i) {
                Some(len) => {
                    blank(&mut b, i, i + len);
                    i += len;
                }
                None => i += 1, // a lifetime or a label
            },
            _ => i += 1,
        }
    }
    // Only whole ASCII-delimited regions were blanked: still UTF-8.
    String::from_utf8(b).expect("blanking keeps UTF-8")
}

/// If a raw string (`r"`, `r#"`, `br#"`, ...) starts at the `r` at `i`: its
/// number of `#`.
fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
    let word_start = |k: usize| k == 0 || !is_ident(b[k - 1]);
    let prefixed = i > 0 && matches!(b[i - 1], b'b' | b'c') && word_start(i - 1);
    if !(word_start(i) || prefixed) {
        return None;
    }
    let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
    (b.get(i + 1 + hashes) == Some(&b'"')).then_some(hashes)
}

/// The length of the character literal starting at the `'` at `i`, if it is
/// one (rather than a lifetime or a label).
fn char_literal_len(b: &[u8], i: usize) -> Option<usize> {
    let first = *b.get(i + 1)?;
    if first == b'\\' {
        // '\n', '\'', '\\', '\x7f', '\u{1f600}'
        let close = b[i + 3..].iter().position(|&c| c == b'\'')?;
        return Some(3 + close + 1);
    }
    // One character, maybe several bytes of UTF-8.
    let width = match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    };
    (b.get(i + 1 + width) == Some(&b'\'')).then_some(width + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(source: &str) -> Vec<(String, usize)> {
        crate_imports(source)
            .into_iter()
            .map(|i| (i.name, i.line))
            .collect()
    }

    fn owned(list: &[(&str, usize)]) -> Vec<(String, usize)> {
        list.iter().map(|&(n, l)| (n.to_string(), l)).collect()
    }

    #[test]
    fn nested_use_group_yields_its_top_level_names() {
        let source = "\
use agent_common::{FlowKey, reason};

use crate::{
    conntrack::{self, fill, install_reverse},
    events, failure,
    headers::{
        ICMP_CHECK_OFFSET, Ipv4, Ports,
    },
    maps::{BACKENDS, inner::{A, B}},
    select as pick, service,
};
";
        assert_eq!(
            names(source),
            owned(&[
                ("conntrack", 4),
                ("events", 5),
                ("failure", 5),
                ("headers", 6),
                ("maps", 9),
                ("select", 10),
                ("service", 10),
            ])
        );
    }

    #[test]
    fn crate_paths_in_code_are_found() {
        let source = "\
use crate::maps::{EVENT_BUDGET, EVENTS};
pub static FRAGMENTS: LruHashMap<FragmentKey, crate::headers::Ports> = x;
fn f() -> u32 {
    crate :: packet::ptr_at(0) + crate::csum::fold(1)
}
use {core::mem, crate::{stats}};
";
        assert_eq!(
            names(source),
            owned(&[
                ("maps", 1),
                ("headers", 2),
                ("packet", 4),
                ("csum", 4),
                ("stats", 6),
            ])
        );
    }

    #[test]
    fn comments_literals_and_lookalikes_are_not_imports() {
        let source = r####"
// use crate::pipeline;
/// See [`crate::pipeline::process`].
/* crate::nat /* nested */ crate::forward */
pub(crate) fn f<'a>(x: &'a str) -> char {
    let _ = "crate::icmp \" crate::sock";
    let _ = r#"crate::bench "still raw" "#;
    let _ = b"crate::select";
    let _ = my_crate::thing;
    macro_rules! m { () => { $crate::x } }
    let _ = '"'; let _ = crate::csum::Diff; let _ = '\'';
    '{'
}
extern crate core;
"####;
        assert_eq!(names(source), owned(&[("csum", 11)]));
    }

    #[test]
    fn module_order_is_read_from_main() {
        let main = "\
//! mod not_this;
#![no_std]

// The layers: mod nor_this;
mod csum;
mod headers;

#[cfg(feature = \"x\")] mod packet;
pub(crate) mod maps;
use packet::Ctx;
mod tests {
    mod inner;
}
";
        assert_eq!(
            declared_modules(main),
            ["csum", "headers", "packet", "maps"]
        );
    }

    fn run(main: &str, files: &[(&str, &str)]) -> Result<Summary> {
        check_with(main, |name| {
            let text = files
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("", |(_, t)| t);
            Ok((format!("src/{name}.rs"), text.to_string()))
        })
    }

    const MAIN: &str = "mod packet;\nmod maps;\n\nmod parse;\n\nmod pipeline;\n";

    #[test]
    fn downward_imports_pass() {
        let summary = run(
            MAIN,
            &[
                ("maps", "use crate::packet::Scratch;\n"),
                (
                    "parse",
                    "use crate::{maps::A, packet::{B, C}};\nfn f() { crate::maps::A; }\n",
                ),
                (
                    "pipeline",
                    "use crate::{maps, packet, parse::{self, Next}};\n",
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            summary,
            Summary {
                modules: 4,
                imports: 6
            }
        );
    }

    #[test]
    fn an_upward_import_is_named_with_file_line_and_reason() {
        let err = run(
            MAIN,
            &[(
                "parse",
                "//! Stage 1.\nuse crate::{\n    maps::FRAGMENTS,\n    pipeline::process,\n};\n",
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "src/parse.rs:4: parse imports pipeline, declared after it: \
                 a stage may only use those above it in main.rs"
            ),
            "{err}"
        );
        assert!(!err.contains("maps"), "{err}");
    }

    #[test]
    fn self_root_items_and_globs_are_refused_too() {
        let err = run(
            MAIN,
            &[
                ("maps", "static X: u32 = crate::maps::Y;\n"),
                ("parse", "use crate::TC_HEADER_BYTES;\n"),
                ("pipeline", "use crate::*;\n"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("3 upward imports"), "{err}");
        assert!(err.contains("src/maps.rs:1: maps imports itself"), "{err}");
        assert!(
            err.contains(
                "src/parse.rs:1: parse imports crate::TC_HEADER_BYTES, which is not a module"
            ),
            "{err}"
        );
        assert!(
            err.contains("src/pipeline.rs:1: pipeline imports crate::*"),
            "{err}"
        );
    }

    #[test]
    fn the_kernel_programs_are_layered() {
        let src = crate::workspace_root().join("agent-ebpf/src");
        let summary = check(&src, "agent-ebpf/src").unwrap();
        assert!(summary.modules > 10, "{summary:?}");
        eprintln!("{summary}");
    }
}
