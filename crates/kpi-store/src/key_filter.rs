//! A scalable Bloom filter of the record keys in the store.
//!
//! Most events name an entity the store has never seen (a new lead, a new deal). Asking sled
//! for a missing key costs a tree walk; the filter answers "certainly absent" for almost all of
//! them in a few hash probes. It may answer "maybe present" for an absent key (about 1 % per
//! layer), which only costs the sled read it would have done anyway. When a layer holds its
//! capacity, a layer twice as large is added, so the filter grows with the store.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

const BITS_PER_KEY: u64 = 10;
const PROBES: u64 = 7;
const FIRST_LAYER_KEYS: u64 = 1 << 20;

struct Layer {
    bits: Vec<u64>,
    capacity: u64,
    inserted: u64,
}

impl Layer {
    fn new(capacity: u64) -> Layer {
        let words = (capacity * BITS_PER_KEY).div_ceil(64) as usize;
        Layer {
            bits: vec![0; words],
            capacity,
            inserted: 0,
        }
    }

    fn bit_count(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    fn probes(&self, hash: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
        let bits = self.bit_count();
        let step = (hash >> 32) | 1;
        (0..PROBES).map(move |i| {
            let bit = hash.wrapping_add(i.wrapping_mul(step)) % bits;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }
}

/// Keys that may be in the store.
pub struct KeyFilter {
    layers: Vec<Layer>,
    first_layer_keys: u64,
    hasher: RandomState,
}

impl Default for KeyFilter {
    fn default() -> Self {
        KeyFilter::new()
    }
}

impl KeyFilter {
    pub fn new() -> KeyFilter {
        KeyFilter::with_first_layer(FIRST_LAYER_KEYS)
    }

    /// A filter whose first layer holds `keys` keys before a second one is added.
    pub fn with_first_layer(keys: u64) -> KeyFilter {
        KeyFilter {
            layers: vec![Layer::new(keys.max(64))],
            first_layer_keys: keys.max(64),
            hasher: RandomState::new(),
        }
    }

    /// Number of layers (the filter grows by adding layers).
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Records that `key` is (or will be) stored.
    pub fn insert(&mut self, key: &[u8]) {
        let hash = self.hasher.hash_one(key);
        if self.may_contain_hash(hash) {
            return;
        }
        let needs_layer = self
            .layers
            .last()
            .is_none_or(|layer| layer.inserted >= layer.capacity);
        if needs_layer {
            let capacity = self
                .layers
                .last()
                .map_or(self.first_layer_keys, |layer| layer.capacity * 2);
            self.layers.push(Layer::new(capacity));
        }
        if let Some(layer) = self.layers.last_mut() {
            let probes: Vec<(usize, u64)> = layer.probes(hash).collect();
            for (word, mask) in probes {
                layer.bits[word] |= mask;
            }
            layer.inserted += 1;
        }
    }

    /// False only if `key` was never inserted.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        self.may_contain_hash(self.hasher.hash_one(key))
    }

    fn may_contain_hash(&self, hash: u64) -> bool {
        self.layers.iter().any(|layer| {
            layer
                .probes(hash)
                .all(|(word, mask)| layer.bits[word] & mask != 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_keys_are_always_found_and_others_mostly_not() {
        let mut filter = KeyFilter::with_first_layer(10_000);
        let count = 30_000; // more than the first layer holds
        for n in 0..count {
            filter.insert(format!("acme\0L{n}").as_bytes());
        }
        for n in 0..count {
            assert!(filter.may_contain(format!("acme\0L{n}").as_bytes()));
        }
        assert!(filter.layer_count() >= 2, "the filter grew");
        let false_positives = (0..100_000)
            .filter(|n| filter.may_contain(format!("acme\0X{n}").as_bytes()))
            .count();
        assert!(
            false_positives < 4_000,
            "{false_positives} false positives in 100000"
        );
    }
}
