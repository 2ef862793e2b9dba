//! The kernel programs' layering, checked by `cargo xtask lint`.
//!
//! agent-ebpf/src/main.rs declares its modules in layers: each module may use
//! only the modules declared above it. This reads that order, then every
//! module's file, collects the crate modules it names (`crate::x` anywhere in
//! code, and each top-level name of a `use crate::{...}` group, however
//! nested; `super::` is read as `crate::`, as it means in a top-level
//! module), and fails on any that is declared at or after the module itself.
//! Plain text handling, no Rust parser: `//` comments and `"..."` strings are
//! blanked first, so only code is read. Fails closed on what it does not
//! handle: block comments, raw strings, a `'"'` character literal, and
//! `mod NAME;` files other than main.rs's own.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result, bail};

/// Checks the crate whose root is `src/main.rs`; `shown` is how file paths
/// appear in messages (e.g. `agent-ebpf/src`). Returns how many modules
/// main.rs declares and how many distinct (module, module above it it uses)
/// pairs there are.
pub fn check(src: &Path, shown: &str) -> Result<(usize, usize)> {
    let root = src.join("main.rs");
    let main =
        std::fs::read_to_string(&root).with_context(|| format!("reading {}", root.display()))?;
    check_with(&format!("{shown}/main.rs"), &main, |name| {
        let flat = format!("{name}.rs");
        let file = if src.join(&flat).exists() {
            flat
        } else {
            format!("{name}/mod.rs")
        };
        let path = src.join(&file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading module {name} ({})", path.display()))?;
        Ok((format!("{shown}/{file}"), text))
    })
}

/// The check itself, over main.rs's path and text and a reader of each
/// module's file (returning the path to show and the text).
pub fn check_with(
    main_file: &str,
    main: &str,
    mut read_module: impl FnMut(&str) -> Result<(String, String)>,
) -> Result<(usize, usize)> {
    let order = declared_modules(main_file, main)?;
    if order.is_empty() {
        bail!("kernel module layers: no `mod NAME;` declaration found in main.rs");
    }
    let mut problems = Vec::new();
    let mut imports = 0;
    for (position, name) in order.iter().enumerate() {
        let (file, text) = read_module(name)?;
        let code = blank_comments_and_strings(&file, &text)?;
        file_modules(&file, &code, false)?;
        // One entry per module used, at the first line naming it.
        let mut used = BTreeMap::new();
        for (imported, line) in crate_imports(&code) {
            used.entry(imported).or_insert(line);
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
    Ok((order.len(), imports))
}

/// Why module `order[position]` may not use `imported`, if it may not.
fn problem(order: &[String], position: usize, imported: &str) -> Option<String> {
    const RULE: &str = "a stage may only use those above it in main.rs";
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
            "{name} imports itself through crate::{name}: use self:: ({RULE})"
        )),
        Some(_) => Some(format!(
            "{name} imports {imported}, declared after it: {RULE}"
        )),
        None => Some(format!(
            "{name} imports crate::{imported}, which is not a module declared in main.rs: \
             the crate root sits below every stage, a stage may only use the modules above \
             it in main.rs"
        )),
    }
}

/// The `mod NAME;` declarations of a crate root, in order (top level only:
/// unindented lines).
pub fn declared_modules(main_file: &str, main: &str) -> Result<Vec<String>> {
    file_modules(
        main_file,
        &blank_comments_and_strings(main_file, main)?,
        true,
    )
}

/// The `mod NAME;` declarations (modules in files of their own) in `code`,
/// the blanked text of `file`: with `root`, those on unindented lines, in
/// order. Any other is a file this lint would not read: an error.
fn file_modules(file: &str, code: &str, root: bool) -> Result<Vec<String>> {
    let b = code.as_bytes();
    let mut modules = Vec::new();
    for (start, end) in words(b).filter(|&(s, e)| &code[s..e] == "mod") {
        let name_start = skip_space(b, end);
        let name_end = ident_end(b, name_start);
        if name_end == name_start || b.get(skip_space(b, name_end)) != Some(&b';') {
            continue; // `mod x { ... }`: inline, read with its file
        }
        let line_start = code[..start].rfind('\n').map_or(0, |p| p + 1);
        let name = &code[name_start..name_end];
        if !root || b[line_start].is_ascii_whitespace() {
            bail!(
                "layers: `mod {name};` in {file}:{} is not followed; extend the lint",
                line_of(b, start)
            );
        }
        modules.push(name.to_string());
    }
    Ok(modules)
}

/// Every `crate::NAME` or `super::NAME` in `code` (blanked; NAME being `*`
/// for a glob), and every top-level NAME of a `crate::{...}` or
/// `super::{...}` group, in order, each with its (1-based) line.
pub fn crate_imports(code: &str) -> Vec<(String, usize)> {
    let b = code.as_bytes();
    let name_end = |j: usize| if b[j] == b'*' { j + 1 } else { ident_end(b, j) };
    let mut found = Vec::new();
    let mut push = |from: usize, to: usize| {
        found.push((code[from..to].to_string(), line_of(b, from)));
    };
    for (start, end) in words(b) {
        if !matches!(&code[start..end], "crate" | "super") {
            continue;
        }
        let mut j = skip_space(b, end);
        if !code[j..].starts_with("::") {
            continue; // `pub(crate)`, `extern crate`
        }
        j = skip_space(b, j + 2);
        match b.get(j) {
            Some(b'{') => {
                // A group: the first name of each item at depth one.
                let mut depth = 0;
                let mut item_start = true;
                while j < b.len() {
                    match b[j] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        b',' if depth == 1 => item_start = true,
                        c if depth == 1 && item_start && (is_ident(c) || c == b'*') => {
                            let end = name_end(j);
                            if &code[j..end] != "self" {
                                push(j, end);
                            }
                            item_start = false;
                            j = end;
                            continue;
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            Some(&c) if c == b'*' || is_ident(c) => push(j, name_end(j)),
            _ => {}
        }
    }
    found
}

/// The byte range of each word (identifier, keyword or number) of `b`.
fn words(b: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        i += b[i..].iter().position(|&c| is_ident(c))?;
        let start = i;
        i = ident_end(b, i);
        Some((start, i))
    })
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn ident_end(b: &[u8], j: usize) -> usize {
    j + b[j..].iter().take_while(|&&c| is_ident(c)).count()
}

fn skip_space(b: &[u8], j: usize) -> usize {
    j + b[j..]
        .iter()
        .take_while(|c| c.is_ascii_whitespace())
        .count()
}

/// The 1-based line of byte `at`.
fn line_of(b: &[u8], at: usize) -> usize {
    1 + b[..at].iter().filter(|&&c| c == b'\n').count()
}

/// `source` (the text of `file`) with `//` comments and `"..."` string
/// literals replaced by spaces (newlines kept, so lines and byte offsets stay
/// where they were). A block comment, a raw string or a `'"'` character
/// literal (which would be read as a string's start) is an error.
fn blank_comments_and_strings(file: &str, source: &str) -> Result<String> {
    let mut b = source.as_bytes().to_vec();
    let n = b.len();
    let mut i = 0;
    while i < n {
        let rest = &b[i..];
        if rest.starts_with(b"/*")
            || rest.starts_with(b"'\"")
            || rest.starts_with(b"'\\\"")
            || (rest[0] == b'r' && rest[1..].iter().find(|&&c| c != b'#') == Some(&b'"'))
        {
            bail!(
                "layers: {file}:{}: block comment / raw string / char literal not supported; \
                 extend the lint",
                line_of(&b, i)
            );
        }
        let end = match rest {
            [b'/', b'/', ..] => rest.iter().position(|&c| c == b'\n').map_or(n, |p| i + p),
            [b'"', ..] => {
                let mut j = i + 1;
                while j < n && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                (j + 1).min(n)
            }
            _ => {
                i += 1;
                continue;
            }
        };
        for c in &mut b[i..end] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        i = end;
    }
    // Only whole ASCII-delimited regions were blanked: still UTF-8.
    Ok(String::from_utf8(b).expect("blanking keeps UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(source: &str) -> Vec<(String, usize)> {
        crate_imports(&blank_comments_and_strings("test.rs", source).unwrap())
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
    fn super_paths_are_read_as_crate_paths() {
        let source = "\
use super::{maps::A, packet};
fn f() -> u32 {
    super :: csum::fold(1) + self::super::parse::g()
}
use super::*;
pub(super) fn g() {}
";
        assert_eq!(
            names(source),
            owned(&[
                ("maps", 1),
                ("packet", 1),
                ("csum", 3),
                ("parse", 3),
                ("*", 5),
            ])
        );
        let stage = "use super::maps::FRAGMENTS;\nfn f() { super::pipeline::process() }\n";
        assert_eq!(
            failure(MAIN, &[("parse", stage)]),
            "kernel module layers: 1 upward import:\n  src/parse.rs:2: parse imports \
             pipeline, declared after it: a stage may only use those above it in main.rs"
        );
    }

    #[test]
    fn comments_literals_and_lookalikes_are_not_imports() {
        let source = "
// use crate::pipeline; /* crate::nat
/// See [`crate::pipeline::process`], r\"crate::bench\".
pub(crate) fn f<'a>(x: &'a str) -> char {
    let _ = \"crate::icmp \\\" crate::sock // r#\\\" /* '\\\"'\";
    let _ = b\"crate::select\";
    let _ = my_crate::thing; let _ = crate_name::x; let _ = for_r;
    let _ = crate::csum::Diff; let _ = '\\'';
    '{'
}
extern crate core;
";
        assert_eq!(names(source), owned(&[("csum", 8)]));
    }

    #[test]
    fn block_comments_raw_strings_and_quote_chars_are_refused() {
        for (source, line) in [
            ("fn f() {}\n/* crate::nat */\n", 2),
            ("\n\nlet _ = r\"crate::bench\";\n", 3),
            ("let _ = br#\"crate::bench\"#;\n", 1),
            ("let _ = '\"'; let _ = crate::csum::Diff;\n", 1),
            ("// ok\nlet _ = '\\\"';\n", 2),
        ] {
            let err = blank_comments_and_strings("src/x.rs", source)
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!(
                    "layers: src/x.rs:{line}: block comment / raw string / char literal \
                     not supported; extend the lint"
                ),
                "{source}"
            );
        }
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
    use super::*;
}
";
        assert_eq!(
            declared_modules("src/main.rs", main).unwrap(),
            ["csum", "headers", "packet", "maps"]
        );
    }

    fn run(main: &str, files: &[(&str, &str)]) -> Result<(usize, usize)> {
        check_with("src/main.rs", main, |name| {
            let text = files
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("", |(_, t)| t);
            Ok((format!("src/{name}.rs"), text.to_string()))
        })
    }

    fn failure(main: &str, files: &[(&str, &str)]) -> String {
        run(main, files).unwrap_err().to_string()
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
        assert_eq!(summary, (4, 6));
    }

    #[test]
    fn an_upward_import_is_named_with_file_line_and_reason() {
        let err = failure(
            MAIN,
            &[(
                "parse",
                "//! Stage 1.\nuse crate::{\n    maps::FRAGMENTS,\n    pipeline::process,\n};\n",
            )],
        );
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
    fn module_files_the_lint_would_not_read_are_refused() {
        let stage = "use crate::maps::A;\npub mod inline {}\n#[path = \"x.rs\"]\nmod hidden;\n";
        assert_eq!(
            failure(MAIN, &[("parse", stage)]),
            "layers: `mod hidden;` in src/parse.rs:4 is not followed; extend the lint"
        );
        let main = "mod csum;\n#[cfg(test)]\nmod tests {\n    mod inner;\n}\n";
        assert_eq!(
            declared_modules("src/main.rs", main)
                .unwrap_err()
                .to_string(),
            "layers: `mod inner;` in src/main.rs:4 is not followed; extend the lint"
        );
    }

    #[test]
    fn self_root_items_and_globs_are_refused_too() {
        let err = failure(
            MAIN,
            &[
                ("maps", "static X: u32 = crate::maps::Y;\n"),
                ("parse", "use crate::TC_HEADER_BYTES;\n"),
                ("pipeline", "use crate::*;\n"),
            ],
        );
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
        let (modules, imports) = check(&src, "agent-ebpf/src").unwrap();
        assert!(modules > 10, "{modules} modules");
        eprintln!("kernel module layers: {modules} modules, {imports} imports of modules above");
    }
}
