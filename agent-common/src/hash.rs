//! Hashes the kernel computes per packet and the agent must reproduce.
//!
//! Fixed seeds: every node computes the same values, so every node picks the
//! same backend for the same 5-tuple (ECMP in front of several nodes is safe).

const SEED: u32 = 0x5_1ce;

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    // One MurmurHash3 round: cheap, no loops, good enough avalanche for slots.
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a connection's 5-tuple (addresses and ports as on the wire).
#[inline(always)]
pub const fn flow_hash(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = SEED;
    h = mix(h, src[0]);
    h = mix(h, src[1]);
    h = mix(h, src[2]);
    h = mix(h, src[3]);
    h = mix(h, dst[0]);
    h = mix(h, dst[1]);
    h = mix(h, dst[2]);
    h = mix(h, dst[3]);
    h = mix(h, (sport as u32) << 16 | dport as u32);
    h = mix(h, proto as u32);
    finish(h)
}

/// Hash of a client address alone: what Maglev picks the backend by for a
/// service with session affinity, so that every connection of a client,
/// on every node, has the same first choice (the affinity entry then keeps
/// it there when the backends change).
#[inline(always)]
pub const fn client_hash(src: &[u32; 4]) -> u32 {
    let mut h = SEED;
    h = mix(h, src[0]);
    h = mix(h, src[1]);
    h = mix(h, src[2]);
    h = mix(h, src[3]);
    finish(h)
}

/// The `attempt`-th alternative to a flow hash, for skipping ejected backends.
#[inline(always)]
pub const fn rehash(h: u32, attempt: u32) -> u32 {
    finish(mix(h, attempt))
}

/// Bit of a prefilter bitmap for an (address, port, protocol); pass port 0
/// and protocol 0 for the address-only bitmaps.
#[inline(always)]
pub const fn prefilter_bit(addr: &[u32; 4], port: u16, proto: u8) -> u32 {
    // Cheaper than flow_hash on purpose: this runs for every packet.
    let x = addr[0] ^ addr[1].rotate_left(7) ^ addr[2].rotate_left(14) ^ addr[3].rotate_left(21);
    let x = x ^ ((port as u32) << 8 | proto as u32).wrapping_mul(0x9e37_79b1);
    finish(x) & (crate::PREFILTER_BITS - 1)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{collections::BTreeSet, vec, vec::Vec};

    use super::*;
    use crate::{
        FlowKey, PREFILTER_BITS, PROTO_TCP, PROTO_UDP,
        testgen::{Gen, v4, v4_nth},
    };

    /// Maglev table sizes the agent accepts (primes): the smallest, the one
    /// its messages suggest, and the usual one.
    const TABLES: [u32; 3] = [251, 16381, 65537];

    /// A web service's VIP, as a client sees it.
    fn to_vip(src: [u32; 4], sport: u16) -> FlowKey {
        FlowKey {
            src,
            dst: v4(192, 0, 2, 10),
            sport: sport.to_be(),
            dport: 443u16.to_be(),
            proto: PROTO_TCP,
            ..FlowKey::default()
        }
    }

    #[test]
    fn flow_hash_is_pinned() {
        // Every node, and every agent version across an upgrade, must compute
        // the same hash for a flow, or ECMP and restarts move connections:
        // a change to these values is a change of that contract.
        let v4_flow = to_vip(v4(10, 0, 0, 1), 40000);
        let v6_flow = FlowKey {
            src: [0x2001_0db8_u32.to_be(), 0, 0, 1u32.to_be()],
            dst: [0x2001_0db8_u32.to_be(), 0, 0, 2u32.to_be()],
            sport: 53000u16.to_be(),
            dport: 53u16.to_be(),
            proto: PROTO_UDP,
            ..FlowKey::default()
        };
        assert_eq!(v4_flow.flow_hash(), 0x493c_d9af);
        assert_eq!(v6_flow.flow_hash(), 0x77d7_1d69);
        assert_eq!(rehash(v4_flow.flow_hash(), 1), 0x69f0_0d2e);
        assert_eq!(
            prefilter_bit(&v4_flow.dst, v4_flow.dport, v4_flow.proto),
            0xdd66
        );
        // The kernel evaluates it at run time, the agent may in const context.
        const CONST: u32 = flow_hash(&[1, 2, 3, 4], &[5, 6, 7, 8], 9, 10, 11);
        assert_eq!(CONST, flow_hash(&[1, 2, 3, 4], &[5, 6, 7, 8], 9, 10, 11));
    }

    /// `t` with one of its 11 fields (4 + 4 address words, 2 ports, the
    /// protocol) changed by XOR with the non-zero `delta`.
    fn with_field(t: &FlowKey, field: usize, delta: u32) -> FlowKey {
        let mut u = *t;
        match field {
            0..=3 => u.src[field] ^= delta,
            4..=7 => u.dst[field - 4] ^= delta,
            8 => u.sport ^= delta as u16,
            9 => u.dport ^= delta as u16,
            10 => u.proto ^= delta as u8,
            _ => unreachable!(),
        }
        u
    }

    /// Bits of each field, in `with_field`'s order.
    const FIELD_BITS: [u32; 11] = [32, 32, 32, 32, 32, 32, 32, 32, 16, 16, 8];

    #[test]
    fn flow_hash_depends_on_every_field() {
        let mut g = Gen::new(2);
        for _ in 0..1000 {
            let t = g.tuple();
            for (field, bits) in FIELD_BITS.into_iter().enumerate() {
                // Any non-zero change of the field's width.
                let delta = match g.u32() & (u32::MAX >> (32 - bits)) {
                    0 => 1,
                    d => d,
                };
                let u = with_field(&t, field, delta);
                assert_ne!(
                    t.flow_hash(),
                    u.flow_hash(),
                    "field {field} ignored: {t:?} vs {u:?}"
                );
            }
        }
    }

    #[test]
    fn one_flipped_input_bit_flips_about_half_the_hash() {
        // Neighbouring flows (next source port, next client address) must not
        // land in neighbouring or equal slots.
        let mut g = Gen::new(3);
        let samples: Vec<FlowKey> = (0..200).map(|_| g.tuple()).collect();
        for (field, bits) in FIELD_BITS.into_iter().enumerate() {
            for bit in 0..bits {
                let flipped: u32 = samples
                    .iter()
                    .map(|t| {
                        (t.flow_hash() ^ with_field(t, field, 1 << bit).flow_hash()).count_ones()
                    })
                    .sum();
                let mean = flipped as f64 / samples.len() as f64;
                assert!(
                    (14.0..=18.0).contains(&mean),
                    "field {field} bit {bit}: {mean:.2} of 32 hash bits flip on average"
                );
            }
        }
    }

    /// Chi-square over degrees of freedom of `counts` against an even spread
    /// (about 1 when even; a skewed hash gives far more).
    fn chi2_per_df(counts: &[u32]) -> f64 {
        let n: u32 = counts.iter().sum();
        let e = n as f64 / counts.len() as f64;
        let chi2: f64 = counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        chi2 / (counts.len() - 1) as f64
    }

    fn slot_counts(hashes: &[u32], size: u32) -> Vec<u32> {
        let mut counts = vec![0u32; size as usize];
        for h in hashes {
            counts[(h % size) as usize] += 1;
        }
        counts
    }

    #[test]
    fn flow_hash_spreads_evenly_over_maglev_tables() {
        const FLOWS: u32 = 100_000;
        let mut g = Gen::new(4);
        let populations: [(&str, Vec<u32>); 4] = [
            (
                "random clients to one VIP:443",
                (0..FLOWS)
                    .map(|_| to_vip(g.addr(), g.u16()).flow_hash())
                    .collect(),
            ),
            (
                "two NAT gateways, every source port in turn",
                (0..FLOWS)
                    .map(|i| {
                        to_vip(
                            v4(198, 51, 100, 1 + (i / 64512) as u8),
                            1024 + (i % 64512) as u16,
                        )
                        .flow_hash()
                    })
                    .collect(),
            ),
            (
                "clients 10.0.0.0 upwards, one source port",
                (0..FLOWS)
                    .map(|i| to_vip(v4_nth(i), 40000).flow_hash())
                    .collect(),
            ),
            (
                "any 5-tuples",
                (0..FLOWS).map(|_| g.tuple().flow_hash()).collect(),
            ),
        ];
        for (name, hashes) in &populations {
            for size in TABLES {
                let counts = slot_counts(hashes, size);
                let share = FLOWS as f64 / size as f64;
                let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                let chi2 = chi2_per_df(&counts);
                let what = std::format!(
                    "{name}, {size} slots: chi2/df {chi2:.3}, slots hold {min}..={max} flows (share {share:.1})"
                );
                assert!(chi2 < 1.4, "{what}");
                if size == 251 {
                    // ~400 flows a slot: every slot within 30% of its share.
                    assert!(
                        *max as f64 <= 1.3 * share && *min as f64 >= 0.7 * share,
                        "{what}"
                    );
                }
                if size == 65537 {
                    // 1.5 flows a slot: even the fullest holds a handful.
                    assert!(*max <= 16, "{what}");
                }
            }
        }
    }

    #[test]
    fn rehash_differs_from_the_hash_and_from_other_attempts() {
        let mut g = Gen::new(5);
        let mut repeated_slot = 0;
        const FLOWS: u32 = 10_000;
        for _ in 0..FLOWS {
            let h = g.tuple().flow_hash();
            // Attempts go on across retries (tcp_state resumes from the last).
            let values: BTreeSet<u32> = core::iter::once(h)
                .chain((1..=64).map(|a| rehash(h, a)))
                .collect();
            assert_eq!(values.len(), 65, "hash {h:#x}: a rehash repeats a value");
            // `select::pick`'s first round: attempt 0 is the hash itself.
            let slots: BTreeSet<u32> = core::iter::once(h)
                .chain((1..8).map(|a| rehash(h, a)))
                .map(|x| x % 65537)
                .collect();
            if slots.len() < 8 {
                repeated_slot += 1;
            }
        }
        // By chance 28 pairs in 65537 slots: about 0.04% of flows.
        assert!(
            repeated_slot * 500 < FLOWS,
            "{repeated_slot} of {FLOWS} flows retry a slot"
        );
    }

    #[test]
    fn rehash_spreads_an_ejected_slot_over_all_others() {
        // The flows of one slot (its backend ejected) must move to every other
        // slot evenly, not pile onto a few backends, at every attempt.
        const SIZE: u32 = 251;
        const EJECTED: u32 = 7;
        const FLOWS: usize = 50_200; // 200 a slot
        let mut g = Gen::new(6);
        let hashes: Vec<u32> = (0..FLOWS)
            .map(|_| g.u32() / SIZE * SIZE + EJECTED)
            .collect();
        for attempt in 1..=8 {
            let moved: Vec<u32> = hashes.iter().map(|&h| rehash(h, attempt)).collect();
            let counts = slot_counts(&moved, SIZE);
            let share = FLOWS as f64 / SIZE as f64;
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            let chi2 = chi2_per_df(&counts);
            let what = std::format!(
                "attempt {attempt}: chi2/df {chi2:.3}, slots get {min}..={max} (share {share:.0}), \
                 {} stay in the ejected slot",
                counts[EJECTED as usize]
            );
            assert!(chi2 < 1.4, "{what}");
            assert!(
                *max as f64 <= 1.35 * share && *min as f64 >= 0.65 * share,
                "{what}"
            );
            assert!((counts[EJECTED as usize] as f64) < 1.35 * share, "{what}");
        }
    }

    #[test]
    fn prefilter_bit_lies_in_the_bitmap_and_reaches_all_of_it() {
        let mut g = Gen::new(7);
        let mut seen = BTreeSet::new();
        // Four inputs a bit: an even spread leaves 1/e^4 (1.8%) unreached.
        for _ in 0..4 * PREFILTER_BITS {
            let (addr, port, proto) = (g.addr(), g.u16(), g.u32() as u8);
            let bit = prefilter_bit(&addr, port, proto);
            assert!(bit < PREFILTER_BITS, "{addr:?} {port} {proto}: bit {bit}");
            seen.insert(bit);
            // The address-only bitmaps' bit likewise.
            assert!(prefilter_bit(&addr, 0, 0) < PREFILTER_BITS);
        }
        let reached = seen.len() as f64 / PREFILTER_BITS as f64;
        assert!(
            reached > 0.97,
            "only {:.1}% of the bits reached",
            100.0 * reached
        );
    }
}
