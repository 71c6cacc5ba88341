//! The event counters of `/metrics` (`kpi_events_*_total`), kept per tenant and label.

/// Which event counter.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CounterKey {
    /// `kpi_events_processed_total{tenant,type}`
    Processed { tenant: String, event_type: String },
    /// `kpi_events_duplicate_total{tenant,type}`
    Duplicate { tenant: String, event_type: String },
    /// `kpi_events_rejected_total{tenant,reason}`
    Rejected { tenant: String, reason: String },
}
