//! Where "now" comes from.
//!
//! Every decision that depends on the date (the current period of the gauges, the default
//! period of the API, the days a connector re-reads, the "more than 24 h in the future" check)
//! reads a [`Clock`] handed down from the binary, never the system clock directly, so that
//! tests and demos can run the engine as if it were the 1st of a month, the last second of a
//! year or a DST change, whatever day they really run on.
//!
//! A clock is the system clock shifted by a fixed offset: [`Clock::starting_at`] reads
//! `start` now and then advances in real time, so timers, scrape intervals and back-offs
//! behave as usual. The `kpi` binary builds its clock from `KPI_CLOCK` (an RFC 3339 instant)
//! when it is set. Operational timestamps compared with other systems' clocks (a connector's
//! last success, read by Prometheus' `time()`) keep the system clock.

use chrono::{DateTime, Duration, Utc};

/// The system clock, shifted by a fixed offset (zero for [`Clock::system`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    offset: Duration,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `start` now and advances in real time from there.
    pub fn starting_at(start: DateTime<Utc>) -> Clock {
        Clock {
            offset: start - Utc::now(),
        }
    }

    /// Whether this clock differs from the system clock.
    pub fn is_shifted(&self) -> bool {
        !self.offset.is_zero()
    }

    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_started_at_an_instant_reads_it_then_advances() {
        let start = DateTime::parse_from_rfc3339("2026-12-31T23:59:59Z")
            .expect("valid")
            .with_timezone(&Utc);
        let clock = Clock::starting_at(start);
        let first = clock.now();
        assert!(
            first >= start && first - start < Duration::seconds(5),
            "{first}"
        );
        assert!(clock.is_shifted());
        assert!(clock.now() >= first);
        assert!(!Clock::system().is_shifted());
    }
}
