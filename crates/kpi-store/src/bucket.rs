//! Buckets: several entity records under one sled key.
//!
//! sled keeps bookkeeping in memory for every page of its tree (a page-table entry and the log
//! positions of the page's fragments), cached or not, and a leaf holds at most 16 keys. With one
//! key per entity that bookkeeping alone passes 300 MB near 6.5M records. So records are
//! grouped: the record of tenant `t`, kind `k` and id `i` lives in bucket
//! `hash(i without its last byte) mod 2^BUCKET_BITS` of `(t, k)`, and a bucket's value lists
//! its records sorted by id.
//!
//! - Ids that differ only in their last byte share a bucket. CRMs number their records, so a
//!   bucket holds about ten of them, usually created close together: a checkpoint writes them
//!   with one sled insert, and the store has about a tenth of the keys.
//! - Random ids (UUIDs) get a bucket each until the buckets fill: at most `2^BUCKET_BITS` keys
//!   per tenant and kind.
//! - The price: writing a record rewrites its bucket (a few KiB at most).
//!
//! A bucket's entries are a sequence of `id length (u32 LE), id, record length (u32 LE),
//! record (postcard)`, sorted by id, ids unique. sled stores them compressed with LZ4
//! ([`pack`]): records of one bucket repeat channel names and event-id shapes, so a bucket
//! shrinks about threefold. That matters beyond disk space: sled's cache counts a page when its
//! shard processes a queue of 64 accesses, so up to 64 pages per shard (256 shards) sit in
//! memory beyond `cache_capacity`, and a page holds 16 values.

/// Buckets per tenant and record kind: part of the store layout (version 2).
pub const BUCKET_BITS: u32 = 20;

/// FNV-1a, then a 64-bit finaliser: stable across builds and platforms, as the layout needs.
fn hash(id: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in id {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash
}

/// The bucket number of an entity id: ids that differ only in their last byte share a bucket.
pub fn bucket_of(id: &[u8]) -> u32 {
    let group = &id[..id.len().saturating_sub(1)];
    (hash(group) >> (64 - BUCKET_BITS)) as u32
}

/// A bucket as stored: its entries compressed, their length first.
pub fn pack(entries: &[u8]) -> Vec<u8> {
    lz4_flex::compress_prepend_size(entries)
}

/// A bucket's entries from its stored bytes.
pub fn unpack(stored: &[u8]) -> Result<Vec<u8>, Malformed> {
    lz4_flex::decompress_size_prepended(stored).map_err(|_| Malformed)
}

/// A bucket's bytes do not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

/// A change to a bucket: the record's id, and its new bytes or `None` to remove it.
pub type Change<'a> = (&'a [u8], Option<&'a [u8]>);

/// The entries of a bucket value; iteration ends after the first malformed one.
pub struct Entries<'a> {
    rest: &'a [u8],
}

fn take_chunk<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (length, tail) = rest.split_first_chunk::<4>()?;
    let length = u32::from_le_bytes(*length) as usize;
    if tail.len() < length {
        return None;
    }
    let (chunk, tail) = tail.split_at(length);
    *rest = tail;
    Some(chunk)
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let mut rest = self.rest;
        let entry = take_chunk(&mut rest).zip(take_chunk(&mut rest));
        self.rest = if entry.is_some() { rest } else { &[] };
        Some(entry.ok_or(Malformed))
    }
}

pub fn entries(bucket: &[u8]) -> Entries<'_> {
    Entries { rest: bucket }
}

/// The record stored under `id`, if any.
pub fn find<'a>(bucket: &'a [u8], id: &[u8]) -> Result<Option<&'a [u8]>, Malformed> {
    for entry in entries(bucket) {
        let (entry_id, record) = entry?;
        match entry_id.cmp(id) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Equal => return Ok(Some(record)),
            std::cmp::Ordering::Greater => return Ok(None),
        }
    }
    Ok(None)
}

fn push_entry(out: &mut Vec<u8>, id: &[u8], record: &[u8]) {
    out.extend_from_slice(&(id.len() as u32).to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(record);
}

/// The bucket `old` with `changes` applied (`(id, Some(record))` sets, `(id, None)` removes);
/// `changes` sorted by id, ids unique. `None` when the bucket ends up empty.
pub fn merge(old: &[u8], changes: &[Change<'_>]) -> Result<Option<Vec<u8>>, Malformed> {
    let old = entries(old).collect::<Result<Vec<_>, Malformed>>()?;
    let mut out = Vec::with_capacity(old.len() * 160 + changes.len() * 160);
    let (mut old, mut changes) = (old.into_iter().peekable(), changes.iter().peekable());
    loop {
        let order = match (old.peek(), changes.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((id, _)), Some((change_id, _))) => id.cmp(change_id),
        };
        if order.is_le() {
            let (id, record) = old.next().ok_or(Malformed)?;
            if order.is_lt() {
                push_entry(&mut out, id, record);
                continue;
            }
        }
        let (id, change) = changes.next().ok_or(Malformed)?;
        if let Some(record) = change {
            push_entry(&mut out, id, record);
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(records: &[(&str, &str)]) -> Vec<u8> {
        let changes: Vec<Change<'_>> = records
            .iter()
            .map(|(id, record)| (id.as_bytes(), Some(record.as_bytes())))
            .collect();
        merge(&[], &changes).expect("merge").expect("not empty")
    }

    fn listed(bucket: &[u8]) -> Vec<(String, String)> {
        entries(bucket)
            .map(|entry| {
                let (id, record) = entry.expect("well formed");
                (
                    String::from_utf8_lossy(id).into_owned(),
                    String::from_utf8_lossy(record).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn merging_sets_replaces_and_removes_in_id_order() {
        let old = bucket(&[("b", "B1"), ("d", "D1"), ("f", "F1")]);
        let changes: Vec<Change<'_>> = vec![
            (b"a", Some(b"A2")),
            (b"d", Some(b"D2")),
            (b"e", None),
            (b"f", None),
            (b"g", Some(b"")),
        ];
        let merged = merge(&old, &changes).expect("merge").expect("not empty");
        let expected = [("a", "A2"), ("b", "B1"), ("d", "D2"), ("g", "")];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(id, record)| (id.to_string(), record.to_string()))
            .collect();
        assert_eq!(listed(&merged), expected);
        assert_eq!(find(&merged, b"d"), Ok(Some(b"D2".as_slice())));
        assert_eq!(find(&merged, b"g"), Ok(Some(b"".as_slice())));
        assert_eq!(find(&merged, b"c"), Ok(None));
        assert_eq!(find(&merged, b"z"), Ok(None));
    }

    #[test]
    fn packed_buckets_unpack_to_their_entries_and_are_smaller() {
        let records: Vec<(String, String)> = (0..10)
            .map(|n| {
                (
                    format!("L12{n}"),
                    format!("channel google_ads event demo-00{n}"),
                )
            })
            .collect();
        let records: Vec<(&str, &str)> = records
            .iter()
            .map(|(id, record)| (id.as_str(), record.as_str()))
            .collect();
        let entries = bucket(&records);
        let packed = pack(&entries);
        assert!(
            packed.len() < entries.len() / 2,
            "{} of {}",
            packed.len(),
            entries.len()
        );
        assert_eq!(unpack(&packed), Ok(entries));
        assert_eq!(unpack(&packed[..packed.len() - 3]), Err(Malformed));
    }

    #[test]
    fn removing_every_record_empties_the_bucket() {
        let old = bucket(&[("x", "1"), ("y", "2")]);
        let changes: Vec<Change<'_>> = vec![(b"x", None), (b"y", None)];
        assert_eq!(merge(&old, &changes), Ok(None));
    }

    #[test]
    fn malformed_bytes_are_reported() {
        let mut old = bucket(&[("x", "record")]);
        old.truncate(old.len() - 1);
        assert_eq!(find(&old, b"x"), Err(Malformed));
        assert_eq!(merge(&old, &[]), Err(Malformed));
        assert!(entries(&old).any(|entry| entry.is_err()));
    }

    #[test]
    fn ids_differing_in_their_last_byte_share_a_bucket_and_others_spread() {
        // Part of the stored layout: these must never change.
        let pinned = [
            bucket_of(b""),
            bucket_of(b"L1"),
            bucket_of("lead-\u{e9}".as_bytes()),
        ];
        assert_eq!(pinned, [969_635, 295_675, 59_589]);
        assert_eq!(bucket_of(b"L120"), bucket_of(b"L129"));
        assert_eq!(bucket_of(b"x"), bucket_of(b""));
        assert_ne!(bucket_of(b"L120"), bucket_of(b"L130"));
        let mut seen = std::collections::HashSet::new();
        for n in 0..10_000 {
            seen.insert(bucket_of(format!("L{n}0").as_bytes()));
        }
        assert!(seen.len() > 9_900, "{} distinct buckets", seen.len());
        assert!(seen.iter().all(|bucket| *bucket < 1 << BUCKET_BITS));
    }
}
