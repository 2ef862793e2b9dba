//! Installs what is missing, idempotently: the nightly toolchain's rust-src
//! (for the eBPF build), bpf-linker, and the Debian packages the tests use.
//! Each check is fast when the piece is already there.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::step;

/// bpf-linker links against the Rust toolchain's own LLVM; this release
/// builds with the toolchains on our machines (see docs/architecture.md).
const BPF_LINKER: &str = "bpf-linker@0.10.3";

/// Debian packages the demo needs, and the command each provides.
const DEMO_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("iputils-ping", "ping"),
    ("procps", "sysctl"),
];

/// Debian packages the tests need on top: a silent backend (nftables), a real
/// Prometheus and promtool, a real headless browser.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("nftables", "nft"),
    ("prometheus", "promtool"),
    ("chromium", "chromium"),
    ("chromium-driver", "chromedriver"),
    ("dnsmasq-base", "dnsmasq"),
    ("dnsutils", "dig"),
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    ("systemd", "systemd-analyze"),
    ("python3-venv", "python3"),
];

/// Real Helm for the chart tests: Helm v4's Go SDK built into a shared
/// library, in a PyPI wheel (no helm binary can be fetched here). Pinned:
/// the tests name the Helm version they ran.
const HELM_SDK: &str = "helm-python-sdk==0.2.2";

/// The virtualenv that holds it; the tests find its Python through
/// SLUICE_HELM_PYTHON, or at this same default (tests/src/helm.rs).
pub fn helm_sdk_python() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    std::path::Path::new(&home).join(".cache/sluice/helm-python-sdk-0.2.2/bin/python")
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Building the agent (eBPF toolchain).
    Build,
    /// The demo: build plus namespaces.
    Demo,
    /// Everything the tests use.
    Tests,
}

pub fn ensure(need: Need) -> Result<()> {
    if need != Need::Build {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the demo and the tests need root (network namespaces, BPF); run as root. \
                 (sudo -E breaks rustup's environment: use a root shell)"
            );
        }
    }
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    if need != Need::Build {
        ensure_packages(DEMO_PACKAGES)?;
    }
    if need == Need::Tests {
        ensure_packages(TEST_PACKAGES)?;
        ensure_helm_sdk()?;
        ensure_disk_space()?;
    }
    Ok(())
}

/// A cold build of the suite (every test binary, three eBPF builds) takes
/// about 3 GB under target/; a full disk shows up as a linker crash
/// (SIGBUS) or "No space left on device" in the middle of the build.
const DISK_NEEDED_BYTES: u64 = 4 << 30;

fn ensure_disk_space() -> Result<()> {
    let target = crate::workspace_root().join("target");
    let probe = if target.exists() {
        target
    } else {
        crate::workspace_root()
    };
    let path = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Ok(()); // can't tell: let the build speak
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let built = crate::workspace_root().join("target/debug").exists();
    if free < DISK_NEEDED_BYTES && !built {
        bail!(
            "only {:.1} GiB free under {}; a cold build of the test suite takes about 3 GB \
             (this check asks for {} GiB): free some space",
            free as f64 / f64::from(1 << 30),
            probe.display(),
            DISK_NEEDED_BYTES >> 30
        );
    }
    Ok(())
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn ensure_nightly_rust_src() -> Result<()> {
    if !quiet(Command::new("rustup").arg("--version")) {
        bail!("rustup is not installed: the eBPF build needs rustup with a nightly toolchain");
    }
    if !quiet(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        step("installing the nightly Rust toolchain (for the eBPF build)");
        if !quiet(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])) {
            bail!(
                "no nightly Rust toolchain and `rustup toolchain install nightly` failed: \
                 install one by hand (the eBPF crate needs -Z build-std)"
            );
        }
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("listing nightly components")?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    let mut missing: Vec<&str> = ["rust-src", "clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    // rust-src is required; clippy and rustfmt only for `xtask lint`.
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "rustup component add {} --toolchain nightly",
        missing.join(" ")
    ));
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add", "--toolchain", "nightly"]);
    cmd.args(&missing);
    if !cmd.status().map(|s| s.success()).unwrap_or(false) {
        missing.retain(|c| *c == "rust-src");
        if !missing.is_empty() {
            bail!(
                "`rustup component add rust-src --toolchain nightly` failed: the eBPF build needs it"
            );
        }
        eprintln!("warning: nightly clippy/rustfmt unavailable: `cargo xtask lint` will fail");
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    if quiet(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    step(&format!(
        "installing {BPF_LINKER} (about 2 to 5 minutes, once)"
    ));
    let status = Command::new("cargo")
        .args(["install", BPF_LINKER, "--locked"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("`cargo install {BPF_LINKER} --locked` failed: see its output above");
    }
    if !quiet(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker installed but not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(pkg, _)| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !quiet(Command::new("apt-get").arg("--version")) {
        bail!("missing packages {missing:?} and no apt-get to install them: install them by hand");
    }
    step(&format!("apt-get install {}", missing.join(" ")));
    let update = Command::new("apt-get").args(["update", "-q"]).status()?;
    if !update.success() {
        bail!("`apt-get update` failed; install {missing:?} by hand");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("`apt-get install {}` failed", missing.join(" "));
    }
    for (pkg, command) in packages {
        if !quiet(Command::new("sh").args(["-c", &format!("command -v {command}")])) {
            bail!("package {pkg} installed but `{command}` is not on PATH");
        }
    }
    Ok(())
}

fn ensure_helm_sdk() -> Result<()> {
    let python = helm_sdk_python();
    if quiet(Command::new(&python).args(["-c", "import helm_python"])) {
        return Ok(());
    }
    let venv = python
        .parent()
        .and_then(|bin| bin.parent())
        .context("the helm-python-sdk venv path")?;
    step(&format!(
        "installing {HELM_SDK} (real Helm v4 as a library, for the chart tests; 75 MB, once) into {}",
        venv.display()
    ));
    if !Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .status()
        .is_ok_and(|s| s.success())
    {
        bail!("`python3 -m venv {}` failed", venv.display());
    }
    let status = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            HELM_SDK,
        ])
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("`pip install {HELM_SDK}` into {} failed", venv.display());
    }
    if !quiet(Command::new(&python).args(["-c", "import helm_python"])) {
        bail!("{HELM_SDK} installed but `import helm_python` fails");
    }
    Ok(())
}
