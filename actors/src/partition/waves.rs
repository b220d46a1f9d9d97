//! Per-key waves: wave `i` holds the `i`-th record of every key in a batch. Running the waves one
//! after another applies each key's records in offset order, while records of different keys share
//! a wave (and so an inference batch). Pure.

use std::collections::HashMap;
use std::hash::Hash;

/// Indices into `keys`, grouped into waves; inside a wave, indices keep their input order.
pub fn waves<K: Hash + Eq>(keys: impl IntoIterator<Item = K>) -> Vec<Vec<usize>> {
    let mut seen: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let n = seen.entry(key).or_insert(0);
        if *n == out.len() {
            out.push(Vec::new());
        }
        out[*n].push(i);
        *n += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn one_key_is_one_wave_per_record() {
        assert_eq!(waves(["a", "b", "a", "c", "a", "b"]), vec![vec![0, 1, 3], vec![2, 5], vec![4]]);
        assert!(waves(Vec::<&str>::new()).is_empty());
    }

    proptest! {
        #[test]
        fn waves_keep_per_key_order_and_cover_everything(keys in proptest::collection::vec(0u8..6, 0..200)) {
            let w = waves(keys.iter().copied());
            let flat: Vec<usize> = w.iter().flatten().copied().collect();
            let mut sorted = flat.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..keys.len()).collect::<Vec<_>>(), "every record exactly once");
            for wave in &w {
                let distinct: HashSet<u8> = wave.iter().map(|&i| keys[i]).collect();
                prop_assert_eq!(distinct.len(), wave.len(), "a key at most once per wave");
                prop_assert!(wave.windows(2).all(|p| p[0] < p[1]), "input order inside a wave");
            }
            // Per key, applying wave after wave visits its records in input order.
            let mut last: HashMap<u8, usize> = HashMap::new();
            for &i in &flat {
                if let Some(&prev) = last.get(&keys[i]) {
                    prop_assert!(prev < i);
                }
                last.insert(keys[i], i);
            }
        }
    }
}
