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
pub fn driver(interface: &str) -> io::Result<String> {
    // SAFETY: plain data; zeroed is a valid value.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ethtool(interface, &mut info)?;
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Whether GRO is on for the device.
pub fn gro(interface: &str) -> io::Result<bool> {
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
