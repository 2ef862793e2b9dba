//! Frames sent as they are, from inside a namespace, through an AF_PACKET
//! socket: forged traffic (spoofed sources, floods) that no socket of the
//! kernel's would send.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Result, bail};
use testbed::Netns;

/// An AF_PACKET socket bound to one device of one namespace.
pub struct RawSender {
    fd: OwnedFd,
}

impl RawSender {
    /// Opens a sender on `dev` in `ns` (the socket stays in `ns`).
    pub fn open(ns: &Netns, dev: &str) -> Result<Self> {
        let dev = std::ffi::CString::new(dev)?;
        ns.enter(move || -> Result<Self> {
            // SAFETY: plain socket(); owned right away.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: a fresh fd we own from here.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: if_nametoindex reads the NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
            if ifindex == 0 {
                bail!("no device {dev:?}");
            }
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: bind with a sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                bail!("bind: {}", std::io::Error::last_os_error());
            }
            Ok(Self { fd })
        })?
    }

    /// Sends one Ethernet frame; false if the device's queue refused it.
    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: send reads `frame.len()` bytes from the slice.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        n == frame.len() as isize
    }
}

/// The MAC address of `dev` in `ns`.
pub fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "ip", "-br", "link", "show", "dev", dev,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "front@if2  UP  02:11:22:33:44:55 <BROADCAST,...>"
    let Some(field) = text.split_whitespace().nth(2) else {
        bail!("no address for {dev} in {}: {text}", ns.name);
    };
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = field.split(':').collect();
    if parts.len() != 6 {
        bail!("not a MAC address for {dev} in {}: {field}", ns.name);
    }
    for (i, part) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}
