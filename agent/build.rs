//! Builds the kernel programs (agent-ebpf) for the BPF target so that a plain
//! `cargo build` of the agent embeds a fresh object. The eBPF crate needs the
//! nightly toolchain (for `-Z build-std=core`) with rust-src, and bpf-linker;
//! `cargo xtask` installs both.
//!
//! It also records the git commit being built (`SLUICE_COMMIT`, for
//! `--version` and `sluice_build_info`).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let ebpf_dir = root.join("agent-ebpf");
    for watched in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=SLUICE_EBPF_OBJECT");
    record_commit(root);

    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let object = out_dir.join("sluice.bpf.o");

    // A prebuilt object (e.g. from a container build stage) skips the eBPF build.
    if let Ok(prebuilt) = env::var("SLUICE_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &object)
            .unwrap_or_else(|e| panic!("copying SLUICE_EBPF_OBJECT={prebuilt}: {e}"));
        return;
    }

    // One shared target directory for every host profile (dev, release, clippy)
    // so the eBPF crate is compiled once, not once per profile.
    let target_dir = root.join("target").join("ebpf");
    build_ebpf(&ebpf_dir, &target_dir);
    let built = target_dir.join("bpfel-unknown-none/release/sluice");
    std::fs::copy(&built, &object)
        .unwrap_or_else(|e| panic!("copying the eBPF object {}: {e}", built.display()));
}

fn build_ebpf(ebpf_dir: &Path, target_dir: &Path) {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!(
            "bpf-linker is not installed: run `cargo xtask test` (it installs what is missing) \
             or `cargo install bpf-linker@0.10.3 --locked`"
        );
    }
    let mut cmd = Command::new("rustup");
    cmd.current_dir(ebpf_dir)
        .args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir);
    // The host build's compiler settings must not leak into the BPF build.
    for (key, _) in env::vars() {
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTUP_TOOLCHAIN")
            || key == "RUSTFLAGS"
            || key == "RUSTDOC"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "running `rustup run nightly cargo build` for agent-ebpf: {e} (is rustup installed?)"
        )
    });
    if !status.success() {
        panic!(
            "building the eBPF programs (agent-ebpf) failed: see the compiler output above; \
             `rustup component add rust-src --toolchain nightly` if core is missing"
        );
    }
}

/// The commit as `git rev-parse --short` names it: from `SLUICE_COMMIT` when
/// set (a container build copies no .git: `--build-arg SLUICE_COMMIT=...`),
/// else from git, else "unknown" (a source tarball, no git installed). Never
/// fails the build.
fn record_commit(root: &Path) {
    println!("cargo:rerun-if-env-changed=SLUICE_COMMIT");
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let commit = env::var("SLUICE_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        // A label value and a version line: nothing that needs escaping.
        .filter(|c| {
            c.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SLUICE_COMMIT={commit}");
    // Built again when HEAD moves: HEAD itself (a checkout), the branch it
    // names (a commit) and packed refs. Only files that exist: cargo reruns
    // every time for one that doesn't.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
