//! The bpf filesystem the datapath is pinned on: found, or mounted private
//! to root (mode 0700), and checked before use. Whoever can write under the
//! pin directory can swap the maps and links that the next agent adopts
//! (its services, backends and connection table), or remove them: so the
//! directory and every parent up to the bpffs mount must be root's, and
//! writable by root alone.

use std::{
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::refusal::Refusal;

/// statfs(2) f_type of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where bpffs is mounted by convention; the agent mounts it there itself
/// when nothing is.
const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// Mode of the directories the agent makes (and of a bpffs it mounts): root
/// alone may enter them.
const PRIVATE_DIR_MODE: u32 = 0o700;

fn statfs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is a
    // NUL-terminated string that outlives the call.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

/// Checks that `dir` is (or will be, once made) on a bpf filesystem. When it
/// is under /sys/fs/bpf and nothing is mounted there, mounts bpffs there,
/// mode 0700 (without a mode, a bpffs root is writable by every user).
pub fn ensure_mounted(dir: &Path) -> Result<(), Refusal> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if statfs_type(existing) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let default = Path::new(DEFAULT_MOUNT);
    if dir.starts_with(default) && default.is_dir() {
        info!("mounting bpffs at /sys/fs/bpf (mode 0700)");
        // SAFETY: mount(2) with constant NUL-terminated strings; the data is
        // the NUL-terminated option string bpffs parses.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        return Err(Refusal(format!(
            "pinning.directory {}: mounting bpffs at /sys/fs/bpf failed: {}. Mount it on the host \
             (mount -t bpf -o mode=0700 bpf /sys/fs/bpf; in Kubernetes the DaemonSet's init \
             container does) and start again",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    Err(Refusal(format!(
        "pinning.directory {} is not on a bpf filesystem: mount one (mount -t bpf -o mode=0700 \
         bpf /sys/fs/bpf) and pin under it",
        dir.display()
    )))
}

/// Makes `dir` (and any missing parents) mode 0700, then checks it is
/// private (see `check_private`). Returns its canonical path: the one
/// checked, so a symbolic link swapped later can't lead elsewhere.
/// `pin_dir` (`pinning.directory`, `dir` or a parent) names the setting in
/// a refusal.
pub fn make_private_dir(dir: &Path, pin_dir: &Path) -> Result<PathBuf, Refusal> {
    let failed = |what: &str, e: std::io::Error| {
        Refusal(format!(
            "pinning.directory {}: {what} {}: {e}",
            pin_dir.display(),
            dir.display()
        ))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(|e| failed("creating", e))?;
    let real = dir.canonicalize().map_err(|e| failed("resolving", e))?;
    check_private(&real, pin_dir)?;
    Ok(real)
}

/// Refuses `dir` unless it and every parent up to the bpffs mount it is on
/// are owned by root (or by the agent's own user) and writable by no group
/// and no other user. The mount's root alone may be writable by all when
/// its sticky bit is set (a bpffs mounted without `mode=`, by the kernel's
/// default 1777): there, as in /tmp, no one can remove or rename root's
/// entries, so a directory root made there stays root's.
pub fn check_private(dir: &Path, pin_dir: &Path) -> Result<(), Refusal> {
    // SAFETY: geteuid has no preconditions and can't fail.
    let euid = unsafe { libc::geteuid() };
    let mut path = dir.to_path_buf();
    loop {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| {
            Refusal(format!(
                "pinning.directory {}: reading {}: {e}",
                pin_dir.display(),
                path.display()
            ))
        })?;
        let parent = path.parent().map(Path::to_path_buf);
        let mount_root = match &parent {
            None => true,
            Some(p) => std::fs::metadata(p).map_or(true, |m| m.dev() != meta.dev()),
        };
        let mode = meta.mode() & 0o7777;
        let wrong = problems(meta.uid(), meta.gid(), mode, euid, mount_root);
        if !wrong.is_empty() {
            let fix = if mount_root {
                format!(
                    "chown root:root {p} && chmod 0700 {p} (or mount the bpffs with -o mode=0700)",
                    p = path.display()
                )
            } else {
                format!(
                    "chown root:root {p} && chmod 0700 {p}, or remove it and let the agent make it",
                    p = path.display()
                )
            };
            return Err(Refusal(format!(
                "pinning.directory {}: {} is owned by uid {} with mode {mode:04o} ({}), so \
                 others could replace the pinned datapath; make it root's and writable by root \
                 alone: {fix}",
                pin_dir.display(),
                path.display(),
                meta.uid(),
                wrong.join(", ")
            )));
        }
        if mount_root {
            if mode & 0o022 != 0 {
                warn!(
                    path = %path.display(),
                    mode = format!("{mode:04o}"),
                    "the bpffs is writable by every user (sticky: they can't touch root's \
                     pins); mount it with -o mode=0700 to keep them out altogether"
                );
            }
            return Ok(());
        }
        path = parent.unwrap_or_default();
    }
}

/// What makes a directory (`mode`, owned by `uid`:`gid`) unsafe to pin
/// under for an agent running as `euid`; empty when nothing does.
fn problems(uid: u32, gid: u32, mode: u32, euid: u32, mount_root: bool) -> Vec<String> {
    let mut wrong = Vec::new();
    if uid != 0 && uid != euid {
        wrong.push(format!("not root's but uid {uid}'s"));
    }
    let sticky_root = mount_root && mode & libc::S_ISVTX != 0;
    if mode & 0o020 != 0 && !sticky_root {
        wrong.push(format!("writable by group {gid}"));
    }
    if mode & 0o002 != 0 && !sticky_root {
        wrong.push("writable by every user".to_string());
    }
    wrong
}

#[cfg(test)]
mod tests {
    use super::problems;

    #[test]
    fn private_directories_pass() {
        assert!(problems(0, 0, 0o700, 0, false).is_empty());
        assert!(problems(0, 0, 0o755, 0, false).is_empty());
        // The agent's own user, when it runs as one with capabilities.
        assert!(problems(998, 998, 0o700, 998, false).is_empty());
    }

    #[test]
    fn others_owning_or_writing_are_named() {
        assert_eq!(
            problems(1000, 1000, 0o700, 0, false),
            ["not root's but uid 1000's"]
        );
        assert_eq!(
            problems(0, 0, 0o777, 0, false),
            ["writable by group 0", "writable by every user"]
        );
        assert_eq!(problems(0, 50, 0o770, 0, false), ["writable by group 50"]);
        // The sticky bit excuses the mount's root, and nothing below it.
        assert_eq!(
            problems(0, 0, 0o1777, 0, false),
            ["writable by group 0", "writable by every user"]
        );
        assert!(problems(0, 0, 0o1777, 0, true).is_empty());
        assert_eq!(problems(0, 0, 0o777, 0, true).len(), 2);
    }
}
