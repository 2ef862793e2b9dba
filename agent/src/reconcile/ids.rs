//! Small integer ids for services and backends (slots of the kernel's
//! arrays).

use std::collections::VecDeque;

use anyhow::{Result, anyhow};

/// A pool of small integer ids; freed ids are reused last, so stale
/// conntrack entries rarely point at a reused id.
pub(super) struct Ids {
    next: u32,
    pub(super) limit: u32,
    free: VecDeque<u32>,
    what: &'static str,
}

impl Ids {
    pub(super) fn new(limit: u32, what: &'static str) -> Self {
        Self {
            next: 0,
            limit,
            free: VecDeque::new(),
            what,
        }
    }
    pub(super) fn take(&mut self) -> Result<u32> {
        if self.next < self.limit {
            self.next += 1;
            return Ok(self.next - 1);
        }
        self.free
            .pop_front()
            .ok_or_else(|| anyhow!("no free {} slot (limit {})", self.what, self.limit))
    }
    /// Marks `used` as taken (adopted from pinned maps).
    pub(super) fn adopt(&mut self, used: &[u32]) {
        self.next = used.iter().map(|&id| id + 1).max().unwrap_or(0);
        self.free = (0..self.next).filter(|id| !used.contains(id)).collect();
    }
    pub(super) fn give(&mut self, id: u32) {
        self.free.push_back(id);
    }
    pub(super) fn available(&self) -> u32 {
        self.limit - self.next + self.free.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_handed_out_in_order_then_reused_last_freed_last() {
        let mut ids = Ids::new(3, "backend");
        assert_eq!([ids.take().unwrap(), ids.take().unwrap()], [0, 1]);
        ids.give(0);
        // A never-used id first: a freed one is reused as late as possible.
        assert_eq!(ids.take().unwrap(), 2);
        ids.give(1);
        assert_eq!(ids.available(), 2);
        assert_eq!([ids.take().unwrap(), ids.take().unwrap()], [0, 1]);
        let full = ids.take().unwrap_err().to_string();
        assert_eq!(full, "no free backend slot (limit 3)");
    }

    #[test]
    fn adopted_ids_stay_taken() {
        let mut ids = Ids::new(8, "service");
        ids.adopt(&[1, 4]);
        let taken: Vec<u32> = (0..6).map(|_| ids.take().unwrap()).collect();
        // 5..8 never used come first, then the holes below the adopted ones.
        assert_eq!(taken, [5, 6, 7, 0, 2, 3]);
        assert_eq!(ids.available(), 0);
    }
}
