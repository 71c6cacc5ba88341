//! Calendar periods (day, ISO week, month, quarter, year, all) and the windows that name them.
//!
//! A period is always a calendar period in a tenant's time zone; converting an instant to its
//! local date is the caller's job (see [`crate::settings::TenantSettings::local_date`]).

use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

/// One calendar period, as written in SPEC section 2 (`2026-03-04`, `2026-W10`, `2026-03`,
/// `2026-Q1`, `2026`, `all`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Period {
    Day(NaiveDate),
    /// ISO 8601 week: the ISO year (which may differ from the calendar year) and week 1..=53.
    Week {
        iso_year: i32,
        week: u32,
    },
    Month {
        year: i32,
        month: u32,
    },
    Quarter {
        year: i32,
        quarter: u32,
    },
    Year(i32),
    All,
}

/// The six windows exported as the `window` label, each naming the kind of a period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    Day,
    Week,
    Month,
    Quarter,
    Year,
    All,
}

impl Window {
    pub const ALL: [Window; 6] = [
        Window::Day,
        Window::Week,
        Window::Month,
        Window::Quarter,
        Window::Year,
        Window::All,
    ];

    /// The label value used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Week => "week",
            Window::Month => "month",
            Window::Quarter => "quarter",
            Window::Year => "year",
            Window::All => "all",
        }
    }

    /// The period of this window that contains `date`.
    pub fn period_of(self, date: NaiveDate) -> Period {
        match self {
            Window::Day => Period::Day(date),
            Window::Week => {
                let iso = date.iso_week();
                Period::Week {
                    iso_year: iso.year(),
                    week: iso.week(),
                }
            }
            Window::Month => Period::Month {
                year: date.year(),
                month: date.month(),
            },
            Window::Quarter => Period::Quarter {
                year: date.year(),
                quarter: (date.month() - 1) / 3 + 1,
            },
            Window::Year => Period::Year(date.year()),
            Window::All => Period::All,
        }
    }
}

impl Period {
    /// The six periods (one per window) that contain `date`, finest first.
    pub fn containing(date: NaiveDate) -> [Period; 6] {
        Window::ALL.map(|window| window.period_of(date))
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Period::Day(date) => write!(f, "{}", date.format("%Y-%m-%d")),
            Period::Week { iso_year, week } => write!(f, "{iso_year:04}-W{week:02}"),
            Period::Month { year, month } => write!(f, "{year:04}-{month:02}"),
            Period::Quarter { year, quarter } => write!(f, "{year:04}-Q{quarter}"),
            Period::Year(year) => write!(f, "{year:04}"),
            Period::All => f.write_str("all"),
        }
    }
}

/// Why a period string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid period `{input}`: expected YYYY-MM-DD, YYYY-Www, YYYY-MM, YYYY-Qn, YYYY or all")]
pub struct PeriodParseError {
    pub input: String,
}

fn parse_year(text: &str) -> Option<i32> {
    if text.len() == 4 && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

fn parse_two_digits(text: &str) -> Option<u32> {
    if text.len() == 2 && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

impl FromStr for Period {
    type Err = PeriodParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = || PeriodParseError {
            input: input.to_string(),
        };
        if input == "all" {
            return Ok(Period::All);
        }
        if let Some(year) = parse_year(input) {
            return Ok(Period::Year(year));
        }
        let (year_text, rest) = input.split_once('-').ok_or_else(error)?;
        let year = parse_year(year_text).ok_or_else(error)?;
        if let Some(week_text) = rest.strip_prefix('W') {
            let week = parse_two_digits(week_text).ok_or_else(error)?;
            // Week 53 exists only in long ISO years: check through chrono.
            NaiveDate::from_isoywd_opt(year, week, chrono::Weekday::Mon).ok_or_else(error)?;
            return Ok(Period::Week {
                iso_year: year,
                week,
            });
        }
        if let Some(quarter_text) = rest.strip_prefix('Q') {
            return match quarter_text {
                "1" | "2" | "3" | "4" => Ok(Period::Quarter {
                    year,
                    quarter: quarter_text.parse().map_err(|_| error())?,
                }),
                _ => Err(error()),
            };
        }
        if let Some(month) = parse_two_digits(rest) {
            if (1..=12).contains(&month) {
                return Ok(Period::Month { year, month });
            }
            return Err(error());
        }
        if rest.len() == 5 {
            let date = NaiveDate::parse_from_str(input, "%Y-%m-%d").map_err(|_| error())?;
            return Ok(Period::Day(date));
        }
        Err(error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
    }

    #[test]
    fn periods_print_as_spec_shows() {
        let printed: Vec<String> = Period::containing(date(2026, 3, 4))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            printed,
            [
                "2026-03-04",
                "2026-W10",
                "2026-03",
                "2026-Q1",
                "2026",
                "all"
            ]
        );
    }

    #[test]
    fn iso_week_year_differs_from_calendar_year_at_new_year() {
        assert_eq!(
            Window::Week.period_of(date(2027, 1, 1)).to_string(),
            "2026-W53"
        );
        assert_eq!(
            Window::Week.period_of(date(2024, 12, 30)).to_string(),
            "2025-W01"
        );
    }

    #[test]
    fn every_printed_period_parses_back() {
        for period in Period::containing(date(2026, 12, 31)) {
            assert_eq!(period.to_string().parse::<Period>(), Ok(period));
        }
    }

    #[test]
    fn malformed_periods_are_refused() {
        for bad in [
            "2026-13",
            "2026-00",
            "2026-Q5",
            "2026-W54",
            "2025-W53",
            "2026-02-30",
            "26",
            "2026-3",
            "2026/03",
            "",
            "ALL",
            "2026-W1",
        ] {
            assert!(bad.parse::<Period>().is_err(), "{bad} should be refused");
        }
        assert!("2026-W53".parse::<Period>().is_ok());
    }
}
