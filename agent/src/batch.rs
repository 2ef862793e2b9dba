//! Map reads in batches (`BPF_MAP_LOOKUP_BATCH`): one syscall for
//! thousands of entries where walking a map key by key costs two syscalls
//! per entry. aya 0.14 has no batch operations, so this is the raw syscall.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::MapData;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per syscall. A hash map's batch ends at a bucket
/// boundary, and a bucket must fit: far more than any bucket holds.
const PER_CALL: usize = 4096;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
const _: () = assert!(std::mem::size_of::<BatchAttr>() == 56);

/// Every entry of the hash map (or LRU hash map) `map`, at most `limit`,
/// `PER_CALL` entries per syscall. Entries that come or go during the read
/// may or may not be in it, as with a key-by-key walk; an entry is never
/// read twice (the kernel's position is a bucket index).
pub fn hash_entries<K, V>(map: &MapData, limit: usize) -> io::Result<Vec<(K, V)>>
where
    K: aya::Pod + Default,
    V: aya::Pod + Default,
{
    let mut out = Vec::new();
    let mut keys = vec![K::default(); PER_CALL];
    let mut values = vec![V::default(); PER_CALL];
    // The hash map's batch position: the next bucket to read.
    let mut position: u32 = 0;
    let mut first = true;
    while out.len() < limit {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut position) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: PER_CALL as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the bpf syscall with a batch lookup whose buffers hold
        // PER_CALL keys and values of the map's key and value sizes (K and
        // V are the map's types; the kernel checks the sizes it copies
        // against the map's), all alive until it returns.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let done = if rc < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: the last buckets were read (`count` says how many
            // entries this call still returned).
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        } else {
            false
        };
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if done {
            break;
        }
        position = next;
        first = false;
    }
    out.truncate(limit);
    Ok(out)
}
