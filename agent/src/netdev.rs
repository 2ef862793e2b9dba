//! What a network device can forward in each attach mode, read from the
//! device itself (ethtool ioctls), so that Sluice never attaches in a mode
//! that silently black-holes traffic.

use std::{ffi::CString, io};

use crate::config::AttachMode;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
const ETHTOOL_GGRO: u32 = 0x0000_002b;

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ethtool_value` (linux/ethtool.h).
#[repr(C)]
struct Value {
    cmd: u32,
    data: u32,
}

/// Runs one ethtool ioctl on `interface` with `data` as its argument.
fn ethtool<T>(interface: &str, data: &mut T) -> io::Result<()> {
    let name = CString::new(interface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    if name.as_bytes_with_nul().len() > libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: a plain socket() call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (data as *mut T).cast();
    // SAFETY: SIOCETHTOOL reads the ifreq and reads/writes the command
    // struct it points to, which is `data`, alive and of the command's type.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

/// The device's driver name ("veth", "virtio_net", "mlx5_core", …).
fn driver(interface: &str) -> io::Result<String> {
    // SAFETY: plain data; zeroed is a valid value.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ethtool(interface, &mut info)?;
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Whether GRO is on for the device.
fn gro(interface: &str) -> io::Result<bool> {
    let mut value = Value {
        cmd: ETHTOOL_GGRO,
        data: 0,
    };
    ethtool(interface, &mut value)?;
    Ok(value.data != 0)
}

/// Why `mode` can't forward on `interface`, if it can't. Auto is never
/// refused here: `auto_order` picks among the modes that can.
pub fn cannot_forward(interface: &str, mode: AttachMode) -> Option<String> {
    if matches!(mode, AttachMode::Auto | AttachMode::Tc) {
        return None; // tc forwards on every device
    }
    let veth = driver(interface).is_ok_and(|d| d == "veth");
    match mode {
        AttachMode::XdpNative if veth => Some(format!(
            "native XDP can't forward on veth {interface}: packets from local senders \
             (pods, containers, namespaces) carry partial checksums that XDP can't see \
             or complete, and frames redirected into a veth are dropped unless its peer \
             runs XDP or GRO; use tc (or auto)"
        )),
        AttachMode::XdpGeneric if veth => Some(format!(
            "generic XDP can't forward on veth {interface}: the peer's senders hand over \
             GSO super-packets larger than the MTU, which generic XDP can't redirect \
             (bulk TCP stalls); use tc (or auto)"
        )),
        AttachMode::XdpGeneric if gro(interface).unwrap_or(false) => Some(format!(
            "generic XDP can't forward on {interface} while GRO is on: it would have to \
             redirect GRO super-packets larger than the MTU; turn GRO off on {interface} \
             (ethtool -K {interface} gro off) or use tc (or auto)"
        )),
        _ => None,
    }
}

/// The modes `auto` tries on `interface`, best first, and why.
pub fn auto_order(interface: &str) -> (&'static [AttachMode], &'static str) {
    match driver(interface) {
        Ok(d) if d == "veth" => (
            &[AttachMode::Tc],
            "veth: XDP can't complete local senders' partial checksums nor redirect their \
             GSO super-packets; tc can",
        ),
        _ => (
            &[AttachMode::XdpNative, AttachMode::Tc],
            "native XDP where the driver supports it, else tc (generic XDP can't redirect \
             GRO super-packets)",
        ),
    }
}

/// Whether a configured interface name is a pattern (`auto` or a glob)
/// rather than one device's name.
pub fn is_pattern(name: &str) -> bool {
    name == "auto" || name.contains(['*', '?', '['])
}

/// A device the config names, as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub attach: AttachMode,
    /// Changes when the device is deleted and made again (a pod's veth):
    /// the kernel dropped the old attachment with the old device.
    pub ifindex: u32,
}

/// The ifindex of `name` in this network namespace, 0 if there is none.
pub fn ifindex(name: &str) -> u32 {
    let Ok(c) = CString::new(name) else { return 0 };
    // SAFETY: if_nametoindex reads the NUL-terminated string only.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// The devices the config's entries name now: exact names as written (if
/// present), globs matched against the devices present (`fnmatch`), and
/// `auto` as the devices that carry an IPv4 or IPv6 default route. The
/// first entry that names a device gives its attach mode; loopback is
/// never matched by a pattern.
pub fn resolve(entries: &[crate::config::Interface]) -> Vec<Device> {
    let present = all_device_names();
    let mut out: Vec<Device> = Vec::new();
    let mut add = |name: &str, attach: AttachMode| {
        let index = ifindex(name);
        if index != 0 && !out.iter().any(|d| d.name == name) {
            out.push(Device {
                name: name.to_string(),
                attach,
                ifindex: index,
            });
        }
    };
    for entry in entries {
        if entry.name == "auto" {
            for name in default_route_devices() {
                add(&name, entry.attach);
            }
        } else if is_pattern(&entry.name) {
            for name in present.iter().filter(|n| *n != "lo") {
                if glob_matches(&entry.name, name) {
                    add(name, entry.attach);
                }
            }
        } else {
            add(&entry.name, entry.attach);
        }
    }
    out
}

/// `fnmatch(3)`: the shell's glob rules, as operators write them.
fn glob_matches(pattern: &str, name: &str) -> bool {
    let (Ok(p), Ok(n)) = (CString::new(pattern), CString::new(name)) else {
        return false;
    };
    // SAFETY: both are valid NUL-terminated strings.
    unsafe { libc::fnmatch(p.as_ptr(), n.as_ptr(), 0) == 0 }
}

/// The network devices of this network namespace (`if_nameindex`, which
/// asks the kernel, unlike /sys/class/net that shows the mounter's).
fn all_device_names() -> Vec<String> {
    // SAFETY: if_nameindex returns an array ending with a zero entry, or
    // NULL; it is freed below with if_freenameindex.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    let mut i = 0;
    loop {
        // SAFETY: within the array, up to and including its zero entry.
        let entry = unsafe { &*list.add(i) };
        if entry.if_index == 0 || entry.if_name.is_null() {
            break;
        }
        // SAFETY: a NUL-terminated name owned by the array.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.if_name) };
        names.push(name.to_string_lossy().into_owned());
        i += 1;
    }
    // SAFETY: the pointer if_nameindex returned, freed once.
    unsafe { libc::if_freenameindex(list) };
    names
}

/// Devices of this namespace's default routes, IPv4 and IPv6.
fn default_route_devices() -> Vec<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    default_devices(&v4, &v6)
}

/// The devices of the default routes in the text of /proc/net/route
/// (destination and mask 0) and /proc/net/ipv6_route (::/0, not loopback).
fn default_devices(v4: &str, v6: &str) -> Vec<String> {
    let mut devices = Vec::new();
    for line in v4.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 7 && f[1] == "00000000" && f[7] == "00000000" {
            devices.push(f[0].to_string());
        }
    }
    for line in v6.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo" {
            devices.push(f[9].to_string());
        }
    }
    devices.sort();
    devices.dedup();
    devices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_devices_from_proc_text() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  ens5\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  ens5\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 enp1s0\n\
                  fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 enp1s0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(default_devices(v4, v6), ["enp1s0", "ens5"]);
    }

    #[test]
    fn globs_match_as_the_shell_does() {
        assert!(glob_matches("eth*", "eth0"));
        assert!(glob_matches("en*", "enp1s0"));
        assert!(glob_matches("back[0-2]", "back1"));
        assert!(!glob_matches("eth*", "veth0"));
        assert!(is_pattern("auto") && is_pattern("en*") && !is_pattern("eth0"));
    }
}
