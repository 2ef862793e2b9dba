//! The MAGLEV array as one pool of slots shared by every service's table.
//!
//! A service's table is sized by its backend count (`table_size_for`), so
//! a pool sized for thousands of small services holds what a fixed table
//! per service (16,381 slots each) could hold for a few dozen. Tables are
//! allocated as aligned power-of-two blocks (a buddy allocator): the sizes
//! are primes just below powers of two, so a block wastes at most a few
//! slots, and freed blocks merge back with their buddies, so churn between
//! sizes does not fragment the pool for good.
//!
//! A table that a service stops using (its entry flipped to a new one) is
//! not reused at once: a packet that read the old entry may still be
//! reading its slots. It is *retired*, and freed only after `QUARANTINE`.
//! An XDP or tc program runs for microseconds, but the socket-level path
//! (the cgroup `connect` hook) runs in process context, which a preemptible
//! kernel may interrupt between reading the entry and reading the slots:
//! a second leaves such a reader far behind. (The two halves per service
//! used before gave the same kind of guarantee: a half was rewritten only
//! at the service's next change.)

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

/// How long a retired table stays untouched before its slots are reused.
pub const QUARANTINE: Duration = Duration::from_secs(1);

/// Table sizes: primes just below powers of two, from 2^8 to 2^20 (each
/// fits its power-of-two block with a few slots to spare). A service's
/// table is the smallest at least `SLOTS_PER_BACKEND` × its backend count,
/// capped at `maglev.table_size`.
pub const SIZES: [u32; 13] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071, 262139, 524287, 1048573,
];

/// Maglev's shares are even to about backends / slots: 100 slots per
/// backend keeps each backend within about 1% of its share.
pub const SLOTS_PER_BACKEND: u64 = 100;

/// The table size of a service with `backends` backends (all of them,
/// draining ones aside: every node computes the same size from the same
/// backend set), with `cap` = `maglev.table_size`.
pub fn table_size_for(backends: usize, cap: u32) -> u32 {
    let want = SLOTS_PER_BACKEND * backends as u64;
    SIZES
        .iter()
        .copied()
        .find(|&s| u64::from(s) >= want)
        .map_or(cap, |s| s.min(cap))
}

/// The block (a power of two) a table of `size` slots takes.
pub fn block_for(size: u32) -> u32 {
    size.next_power_of_two()
}

/// The pool's capacity for `max_services` services and `max_backends`
/// backends with tables capped at `cap`: enough for every service's
/// smallest block plus two slots-per-backend blocks' worth per backend
/// (a block is under 2 × 100 slots per backend above the smallest), plus
/// one table of each service being replaced at a time (`cap`'s block).
pub fn pool_slots(max_services: u32, max_backends: u32, cap: u32) -> u64 {
    let smallest = u64::from(block_for(SIZES[0]).min(block_for(cap)));
    u64::from(max_services) * smallest
        + u64::from(max_backends) * 2 * SLOTS_PER_BACKEND
        + 2 * u64::from(block_for(cap))
}

/// The allocator: free blocks by order (log2 of the size), allocated
/// regions by offset, retired regions waiting out their quarantine.
pub struct Slots {
    capacity: u32,
    free: Vec<BTreeSet<u32>>,
    /// offset → length of every allocated region (a block, or a table an
    /// earlier agent left, adopted with its exact length).
    used: BTreeMap<u32, u32>,
    retired: VecDeque<(Instant, u32)>,
}

impl Slots {
    /// A pool of `capacity` slots, all free.
    pub fn new(capacity: u32) -> Self {
        let mut slots = Self {
            capacity,
            free: vec![BTreeSet::new(); 33],
            used: BTreeMap::new(),
            retired: VecDeque::new(),
        };
        slots.free_range(0, capacity);
        slots
    }

    /// A pool whose `regions` (offset, length) are in use: the live tables
    /// of pinned services, adopted. Regions that overlap or run past the
    /// pool are refused (the pinned state isn't what this agent wrote).
    pub fn with_used(capacity: u32, regions: &[(u32, u32)]) -> anyhow::Result<Self> {
        let mut sorted = regions.to_vec();
        sorted.sort_unstable();
        let mut slots = Self {
            capacity,
            free: vec![BTreeSet::new(); 33],
            used: BTreeMap::new(),
            retired: VecDeque::new(),
        };
        let mut at = 0u32;
        for &(offset, len) in &sorted {
            let end = offset.checked_add(len).filter(|&e| e <= capacity);
            let Some(end) = end.filter(|_| offset >= at) else {
                anyhow::bail!(
                    "pinned Maglev table at slots {offset}..{} overlaps another or runs past the {capacity}-slot array",
                    u64::from(offset) + u64::from(len)
                );
            };
            slots.free_range(at, offset);
            slots.used.insert(offset, len);
            at = end;
        }
        slots.free_range(at, capacity);
        Ok(slots)
    }

    /// A region for a table of `size` slots; `None` when no block of its
    /// size is free, even after waiting out the quarantine of retired ones.
    pub fn alloc(&mut self, size: u32) -> Option<u32> {
        self.reclaim(false);
        if let Some(offset) = self.take(size) {
            return Some(offset);
        }
        if self.retired.is_empty() {
            return None;
        }
        // Full of retired tables (an apply that replaced many at once):
        // wait them out rather than refuse.
        self.reclaim(true);
        self.take(size)
    }

    /// Stops using the region at `offset` (the service no longer points at
    /// it); its slots are reused after the quarantine.
    pub fn retire(&mut self, offset: u32) {
        self.retired.push_back((Instant::now(), offset));
    }

    /// Slots neither free nor retired.
    pub fn in_use(&self) -> u64 {
        let retired: u64 = self
            .retired
            .iter()
            .map(|(_, o)| u64::from(self.used.get(o).copied().unwrap_or(0)))
            .sum();
        self.used.values().map(|&l| u64::from(l)).sum::<u64>() - retired
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn take(&mut self, size: u32) -> Option<u32> {
        let order = block_for(size).trailing_zeros() as usize;
        let found = (order..self.free.len()).find(|&o| !self.free[o].is_empty())?;
        let offset = self.free[found].pop_first()?;
        // Split down to the order asked for; the upper halves stay free.
        for o in (order..found).rev() {
            self.free[o].insert(offset + (1 << o));
        }
        self.used.insert(offset, 1 << order);
        Some(offset)
    }

    /// Frees retired regions whose quarantine is over (`wait`: sleeps until
    /// every retired region's is).
    fn reclaim(&mut self, wait: bool) {
        if wait && let Some(&(last, _)) = self.retired.back() {
            let left = QUARANTINE.saturating_sub(last.elapsed());
            std::thread::sleep(left);
        }
        while let Some(&(at, offset)) = self.retired.front() {
            if at.elapsed() < QUARANTINE {
                break;
            }
            self.retired.pop_front();
            if let Some(len) = self.used.remove(&offset) {
                self.free_range(offset, offset + len);
            }
        }
    }

    /// Frees `start..end` as the largest aligned blocks it holds, each
    /// merged with its buddy while that is free.
    fn free_range(&mut self, mut start: u32, end: u32) {
        while start < end {
            let mut order = if start == 0 {
                31
            } else {
                start.trailing_zeros()
            };
            while u64::from(start) + (1u64 << order) > u64::from(end) {
                order -= 1;
            }
            self.free_block(start, order as usize);
            start += 1 << order;
        }
    }

    fn free_block(&mut self, mut offset: u32, mut order: usize) {
        while order < 31 {
            let buddy = offset ^ (1 << order);
            if !self.free[order].remove(&buddy) {
                break;
            }
            offset = offset.min(buddy);
            order += 1;
        }
        self.free[order].insert(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_prime(n: u32) -> bool {
        n >= 2
            && (2..)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
    }

    #[test]
    fn sizes_are_primes_that_fit_their_blocks() {
        for (i, &s) in SIZES.iter().enumerate() {
            assert!(is_prime(s), "{s}");
            assert_eq!(block_for(s), 1 << (8 + i), "{s}");
        }
    }

    #[test]
    fn tables_hold_100_slots_per_backend_up_to_the_cap() {
        assert_eq!(table_size_for(0, 16381), 251);
        assert_eq!(table_size_for(2, 16381), 251);
        assert_eq!(table_size_for(3, 16381), 509);
        assert_eq!(table_size_for(10, 16381), 1021);
        assert_eq!(table_size_for(11, 16381), 2039);
        assert_eq!(table_size_for(163, 16381), 16381);
        assert_eq!(table_size_for(5000, 16381), 16381);
        // A cap between the list's sizes is itself a size.
        assert_eq!(table_size_for(100, 7919), 7919);
        assert_eq!(table_size_for(5000, 1_000_003), 524_287);
        assert_eq!(table_size_for(10_001, 1_000_003), 1_000_003);
        // The smallest cap is the smallest table.
        assert_eq!(table_size_for(1, 251), 251);
    }

    #[test]
    fn blocks_are_aligned_split_and_merged_back() {
        let mut s = Slots::new(4096);
        let a = s.take(251).unwrap();
        let b = s.take(509).unwrap();
        let c = s.take(251).unwrap();
        assert_eq!((a, b, c), (0, 512, 256));
        assert_eq!(s.in_use(), 1024);
        for o in [a, b, c] {
            let len = s.used.remove(&o).unwrap();
            s.free_range(o, o + len);
        }
        // Everything merged back into the one 4096-slot block.
        assert_eq!(s.free[12].len(), 1);
        assert!(s.free[..12].iter().all(BTreeSet::is_empty));
    }

    #[test]
    fn a_full_pool_refuses_then_reuses_retired_tables_after_the_quarantine() {
        let mut s = Slots::new(1024);
        let a = s.alloc(1021).unwrap();
        assert_eq!(s.alloc(251), None);
        s.retire(a);
        let t = Instant::now();
        assert_eq!(s.alloc(509), Some(0));
        assert!(t.elapsed() >= QUARANTINE);
        assert_eq!(s.alloc(251), Some(512));
    }

    #[test]
    fn adopted_regions_of_any_alignment_stay_taken_and_free_exactly() {
        // An earlier layout's tables: 1021 slots each, back to back.
        let mut s = Slots::with_used(8192, &[(1021, 1021), (3063, 1021)]).unwrap();
        assert_eq!(s.in_use(), 2042);
        let mut taken = Vec::new();
        while let Some(o) = s.take(251) {
            taken.push((o, o + 256));
        }
        for (o, end) in &taken {
            assert!(
                *end <= 1021 || (*o >= 2042 && *end <= 3063) || *o >= 4084,
                "{o}"
            );
        }
        for (o, _) in taken {
            let len = s.used.remove(&o).unwrap();
            s.free_range(o, o + len);
        }
        for o in [1021, 3063] {
            let len = s.used.remove(&o).unwrap();
            s.free_range(o, o + len);
        }
        assert_eq!(s.free[13].len(), 1, "all merged back: {:?}", s.free);
        let overlapping = Slots::with_used(8192, &[(0, 1021), (1000, 1021)]);
        assert!(overlapping.is_err());
        assert!(Slots::with_used(1024, &[(100, 1021)]).is_err());
    }

    #[test]
    fn a_pool_that_is_not_a_power_of_two_is_used_whole() {
        let mut s = Slots::new(3 * 1024 + 256);
        let got: Vec<u32> = std::iter::from_fn(|| s.take(1021)).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(s.take(251), Some(3072));
        assert_eq!(s.take(251), None);
    }
}
