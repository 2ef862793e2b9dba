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

/// One `BPF_MAP_LOOKUP_BATCH` call: up to `count` keys and values into
/// `keys` and `values` from the position `from` (None: the start), the
/// next position written to `next`. Ok((entries read, whether the map's
/// end was reached)).
///
/// # Safety
/// `keys` and `values` must hold `count` keys and `count` values of the
/// map's key and value sizes (per-CPU maps: × the CPUs, each rounded up to
/// 8 bytes), and `next` the map's batch position (a u32 for arrays and
/// hash maps).
unsafe fn lookup_batch(
    map: &MapData,
    from: Option<&mut u32>,
    next: &mut u32,
    keys: *mut u8,
    values: *mut u8,
    count: u32,
) -> io::Result<(usize, bool)> {
    let mut attr = BatchAttr {
        in_batch: from.map_or(0, |p| std::ptr::from_mut(p) as u64),
        out_batch: std::ptr::from_mut(next) as u64,
        keys: keys as u64,
        values: values as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: the buffers are as the caller promises, alive until the
    // syscall returns; the kernel checks what it copies against the map.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // ENOENT: the end was reached (`count` says how many entries this
        // call still returned).
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
        return Ok((attr.count as usize, true));
    }
    Ok((attr.count as usize, false))
}

/// Entries `0..n` of the array (or per-CPU array, `cpus` values per
/// entry) `map`, in one syscall. `V`'s size must be a multiple of 8: the
/// kernel's stride between per-CPU values.
pub fn array_values<V: aya::Pod + Default>(
    map: &MapData,
    n: u32,
    cpus: usize,
) -> io::Result<Vec<V>> {
    if !std::mem::size_of::<V>().is_multiple_of(8) {
        return Err(io::Error::other(format!(
            "batch lookup of {}-byte values: not a multiple of 8",
            std::mem::size_of::<V>()
        )));
    }
    let mut values = vec![V::default(); n as usize * cpus];
    if n == 0 {
        return Ok(values);
    }
    let mut keys = vec![0u32; n as usize];
    let mut next = 0u32;
    // SAFETY: `n` u32 keys (an array's key) and `n` × `cpus` values of V,
    // the map's value type.
    let (read, _) = unsafe {
        lookup_batch(
            map,
            None,
            &mut next,
            keys.as_mut_ptr().cast(),
            values.as_mut_ptr().cast(),
            n,
        )
    }?;
    values.truncate(read * cpus);
    Ok(values)
}

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
    let mut position: Option<u32> = None;
    while out.len() < limit {
        let mut next = 0u32;
        // SAFETY: PER_CALL keys and values of K and V, the map's types.
        let (n, done) = unsafe {
            lookup_batch(
                map,
                position.as_mut(),
                &mut next,
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                PER_CALL as u32,
            )
        }?;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if done {
            break;
        }
        position = Some(next);
    }
    out.truncate(limit);
    Ok(out)
}
