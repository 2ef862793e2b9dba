//! The MAGLEV array mapped into the agent's memory.

use anyhow::{Context, Result, anyhow};
use aya::{Ebpf, maps::MapData};

use agent_common::registry::map;

/// The kernel lays array elements out 8 bytes apart: a u32 value, then
/// padding. In u32 units.
const ELEMENT_STRIDE: usize = 2;

/// The MAGLEV array mapped into our memory: tables are written with plain
/// stores, visible to the kernel at once. A service points at a table only
/// after it is complete (the service entry's update is a syscall, which
/// orders the stores before it).
pub struct MaglevTables {
    ptr: std::ptr::NonNull<u32>,
    slots: usize,
    map_len: usize,
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory owned by this struct; access
// goes through &mut self (writes) or &self (reads).
unsafe impl Send for MaglevTables {}

impl MaglevTables {
    pub(super) fn map(ebpf: &mut Ebpf) -> Result<Self> {
        let data = match ebpf.take_map(map::MAGLEV) {
            Some(aya::maps::Map::Array(data)) => data,
            _ => anyhow::bail!("map MAGLEV is missing or not an array"),
        };
        let info = data.info().context("MAGLEV map info")?;
        if info.value_size() != 4 {
            anyhow::bail!(
                "map MAGLEV has {}-byte values, expected 4",
                info.value_size()
            );
        }
        let slots = info.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map_len = (slots * ELEMENT_STRIDE * 4).div_ceil(page) * page;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // SAFETY: mapping an mmapable BPF array by its fd, read-write and
        // shared, over exactly its page-rounded size; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(anyhow!(
                "mapping the MAGLEV array into memory: {} (it must be BPF_F_MMAPABLE)",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self {
            ptr: std::ptr::NonNull::new(ptr.cast()).context("mmap returned null")?,
            slots,
            map_len,
            _map: data,
        })
    }

    /// A read handle of its own on the array (a duplicate of its fd), for
    /// the read side (`sluice explain`): slot lookups by syscall.
    pub fn reader(&self) -> Result<aya::maps::Array<MapData, u32>> {
        use std::os::fd::AsFd as _;
        let fd = self
            ._map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the MAGLEV map's fd")?;
        let data = MapData::from_fd(fd).context("MAGLEV map from its fd")?;
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).context("MAGLEV as an array")
    }

    /// The array's capacity in slots.
    pub fn slots(&self) -> u32 {
        self.slots as u32
    }

    /// Writes `table` at slot `offset`.
    pub fn write(&mut self, offset: u32, table: &[u32]) -> Result<()> {
        let start = offset as usize;
        if start + table.len() > self.slots {
            anyhow::bail!(
                "Maglev slots {start}..{} are past the array's {}",
                start + table.len(),
                self.slots
            );
        }
        // SAFETY: the range was checked to lie inside the mapping, which
        // lives as long as self; u32 stores need no other invariant.
        let slots = unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(start * ELEMENT_STRIDE),
                table.len() * ELEMENT_STRIDE,
            )
        };
        for (slot, &id) in slots.chunks_exact_mut(ELEMENT_STRIDE).zip(table) {
            // SAFETY: a valid, aligned u32 of the mapping. Volatile: the
            // kernel reads this memory concurrently.
            unsafe { std::ptr::write_volatile(&mut slot[0], id) };
        }
        Ok(())
    }
}

impl Drop for MaglevTables {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mmap returned.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}
