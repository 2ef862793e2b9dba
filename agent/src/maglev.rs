//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016).
//!
//! Each backend walks its own permutation of the table's slots and claims the
//! next free one in turn; a backend of weight w takes w turns for every
//! `max_weight` rounds, so its share of slots is w / Σw. Removing one backend of
//! N moves about 1/N of the slots. The permutation depends only on the
//! backend's address (fixed seeds, sorted order), never on config order or the
//! node: every node builds the same table from the same backend set.

use std::net::SocketAddr;

/// A slot that belongs to no backend (no backend has a positive weight).
pub const EMPTY: u32 = u32::MAX;

/// Builds a table of `size` slots (a prime). Each slot holds an index into
/// `backends`, or [`EMPTY`].
pub fn build(backends: &[(SocketAddr, u32)], size: u32) -> Vec<u32> {
    let m = size as usize;
    let mut table = vec![EMPTY; m];
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
    if order.is_empty() {
        return table;
    }
    order.sort_by_key(|&i| backends[i].0);
    let max_weight = order.iter().map(|&i| backends[i].1).max().unwrap_or(1);

    struct Walker {
        index: u32,
        weight: u32,
        offset: u64,
        skip: u64,
        next: u64,
    }
    let mut walkers: Vec<Walker> = order
        .iter()
        .map(|&i| {
            let key = backends[i].0.to_string();
            let h1 = fnv1a(key.as_bytes(), 0xcbf2_9ce4_8422_2325);
            let h2 = fnv1a(key.as_bytes(), 0x8422_2325_cbf2_9ce4);
            Walker {
                index: i as u32,
                weight: backends[i].1,
                offset: h1 % size as u64,
                skip: h2 % (size as u64 - 1) + 1,
                next: 0,
            }
        })
        .collect();

    let mut filled = 0usize;
    let mut round: u64 = 0;
    while filled < m {
        for w in &mut walkers {
            // Turns owed after this round minus turns taken before it.
            let turns = ((round + 1) * w.weight as u64) / max_weight as u64
                - (round * w.weight as u64) / max_weight as u64;
            for _ in 0..turns {
                let mut slot = ((w.offset + w.next * w.skip) % size as u64) as usize;
                while table[slot] != EMPTY {
                    w.next += 1;
                    slot = ((w.offset + w.next * w.skip) % size as u64) as usize;
                }
                table[slot] = w.index;
                w.next += 1;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
        round += 1;
    }
    table
}

/// FNV-1a: stable across Rust versions and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| {
                (
                    format!("10.1.{}.{}:80", i / 200, i % 200 + 1)
                        .parse()
                        .unwrap(),
                    1,
                )
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &s in table {
            counts[s as usize] += 1;
        }
        counts
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let b = backends(7);
        let t = build(&b, 16_381);
        assert!(t.iter().all(|&s| s != EMPTY));
        let expected = 16_381.0 / 7.0;
        for c in shares(&t, 7) {
            assert!(
                (c as f64 - expected).abs() / expected < 0.02,
                "{c} vs {expected}"
            );
        }
    }

    #[test]
    fn weights_are_honoured() {
        let mut b = backends(3);
        b[0].1 = 1;
        b[1].1 = 2;
        b[2].1 = 3;
        let t = build(&b, 16_381);
        let c = shares(&t, 3);
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let want = 16_381.0 * w / 6.0;
            assert!(
                (c[i] as f64 - want).abs() / want < 0.02,
                "backend {i}: {} vs {want}",
                c[i]
            );
        }
    }

    #[test]
    fn zero_weight_gets_nothing() {
        let mut b = backends(3);
        b[1].1 = 0;
        let t = build(&b, 251);
        assert!(!t.contains(&1));
        assert!(build(&[(b[0].0, 0)], 251).iter().all(|&s| s == EMPTY));
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        for n in [3usize, 10, 50] {
            let all = backends(n);
            let before = build(&all, 65_537);
            let removed = n / 2;
            let rest: Vec<_> = all
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != removed)
                .map(|(_, b)| *b)
                .collect();
            let after = build(&rest, 65_537);
            // Compare by address: indices shift when one is removed.
            let moved = before
                .iter()
                .zip(&after)
                .filter(|&(&b, &a)| all[b as usize].0 != rest[a as usize].0)
                .count();
            let fraction = moved as f64 / 65_537.0;
            let ideal = 1.0 / n as f64;
            // The removed backend's slots must move; Maglev moves a little more.
            assert!(fraction >= ideal * 0.95, "n={n}: moved {fraction}");
            assert!(
                fraction <= ideal * 1.6 + 0.01,
                "n={n}: moved {fraction}, ideal {ideal}"
            );
        }
    }

    #[test]
    fn order_of_backends_does_not_matter() {
        let b = backends(5);
        let mut r = b.clone();
        r.reverse();
        let t1: Vec<SocketAddr> = build(&b, 4093).iter().map(|&i| b[i as usize].0).collect();
        let t2: Vec<SocketAddr> = build(&r, 4093).iter().map(|&i| r[i as usize].0).collect();
        assert_eq!(t1, t2);
    }
}
