//! Tenants to partitions, as nats-server's `partition(n, 1)` subject mapping does it.
//!
//! A tenant's partition is the 32-bit FNV-1a hash of its name (UTF-8 bytes) modulo the number
//! of partitions. The server applies the same function in the stream's subject transform, so
//! the engine can tell which partition holds a tenant without asking.

/// The 32-bit FNV-1a hash of `bytes`.
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &byte in bytes {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The partition of `tenant` among `partitions` (at least 1).
pub fn partition_of(tenant: &str, partitions: u32) -> u32 {
    fnv1a_32(tenant.as_bytes()) % partitions.max(1)
}

/// The prefix the partitioned stream's subject transform puts before an event subject
/// (`<partition>.kpi.events.<tenant>.<type>`), and the subject without it.
pub fn split_partitioned_subject(subject: &str) -> Option<(u32, &str)> {
    let (head, rest) = subject.split_once('.')?;
    if head.is_empty() || !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((head.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference (draft-eastlake-fnv): "", "a", "foobar".
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        for partitions in [1, 2, 7, 64, 1000] {
            for tenant in ["acme", "default", "t-0001", "zürich"] {
                let p = partition_of(tenant, partitions);
                assert!(p < partitions);
                assert_eq!(p, partition_of(tenant, partitions));
            }
        }
        assert_eq!(partition_of("a", 0), 0, "0 partitions is read as 1");
    }

    #[test]
    fn partitioned_subjects_split_at_the_number() {
        assert_eq!(
            split_partitioned_subject("12.kpi.events.acme.lead_created"),
            Some((12, "kpi.events.acme.lead_created"))
        );
        assert_eq!(
            split_partitioned_subject("kpi.events.acme.lead_created"),
            None
        );
        assert_eq!(split_partitioned_subject("12"), None);
        assert_eq!(split_partitioned_subject(".kpi"), None);
    }
}
