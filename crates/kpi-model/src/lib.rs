//! The pure domain of the KPI engine: no I/O, no async, no storage.
//!
//! - [`clock`]: where "now" comes from (the system clock, or a shifted one in tests);
//! - [`encode`]: the one encoder of events, for every producer;
//! - [`event`]: subjects, the CloudEvents envelope, validation and rejection reasons;
//! - [`period`]: calendar periods and windows;
//! - [`money`]: exact decimal amounts;
//! - [`settings`]: per-tenant time zone, currency and FX rates;
//! - [`record`]: entity records (leads, deals, customers, spend lines), the durable state;
//! - [`batch`]: applying events to records, producing record writes and aggregate deltas;
//! - [`aggregate`]: additive KPI counters and each record's contribution to them;
//! - [`report`]: KPI tables as the API shows them.
//!
//! The central invariant: the aggregates are the sum of the contributions of the current
//! records, and the records are a function of the *set* of distinct events applied (LWW
//! registers and grow-only sets). So the KPIs do not depend on the order of events, nor on how
//! often each is delivered, and they can always be rebuilt from the records or from the stream.

pub mod aggregate;
pub mod batch;
pub mod clock;
pub mod counter;
pub mod encode;
pub mod event;
pub mod money;
pub mod partition;
pub mod period;
pub mod record;
pub mod report;
pub mod settings;

pub use aggregate::{contribute, Aggregates, Cell, TenantAggregates};
pub use batch::{aggregate_records, Batch, BatchOutput, Outcome, RecordSource, WorkingSet};
pub use clock::Clock;
pub use counter::CounterKey;
pub use event::{
    decode_event, DecodeLimits, Event, EventData, EventType, RejectReason, Rejection, Timestamp,
    Version,
};
pub use partition::partition_of;
pub use period::{Period, Window};
pub use record::{Record, RecordKey};
pub use report::{KpiReport, KpiSeries, Page, RetentionReport, RetentionSeries, Rows, Scope};
pub use settings::{TenantSettings, Tenants};
