//! Builds the kernel programs (agent-ebpf) for the BPF target so that a plain
//! `cargo build` of the agent embeds a fresh object. The eBPF crate needs the
//! nightly toolchain (for `-Z build-std=core`) with rust-src, and bpf-linker;
//! `cargo xtask` installs both.

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
