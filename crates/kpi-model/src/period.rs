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

impl Window {
    /// The window named `label` (`day`, `week`, `month`, `quarter`, `year` or `all`).
    pub fn from_label(label: &str) -> Option<Window> {
        Window::ALL
            .into_iter()
            .find(|window| window.label() == label)
    }
}

impl Period {
    /// The six periods (one per window) that contain `date`, finest first.
    pub fn containing(date: NaiveDate) -> [Period; 6] {
        Window::ALL.map(|window| window.period_of(date))
    }

    /// The window this period is a period of.
    pub fn window(&self) -> Window {
        match self {
            Period::Day(_) => Window::Day,
            Period::Week { .. } => Window::Week,
            Period::Month { .. } => Window::Month,
            Period::Quarter { .. } => Window::Quarter,
            Period::Year(_) => Window::Year,
            Period::All => Window::All,
        }
    }

    /// The first day of the period (`None` for `all`).
    pub fn first_day(&self) -> Option<NaiveDate> {
        match *self {
            Period::Day(date) => Some(date),
            Period::Week { iso_year, week } => {
                NaiveDate::from_isoywd_opt(iso_year, week, chrono::Weekday::Mon)
            }
            Period::Month { year, month } => NaiveDate::from_ymd_opt(year, month, 1),
            Period::Quarter { year, quarter } => NaiveDate::from_ymd_opt(year, quarter * 3 - 2, 1),
            Period::Year(year) => NaiveDate::from_ymd_opt(year, 1, 1),
            Period::All => None,
        }
    }

    /// The period of the same window that follows this one (`None` for `all`, and past the
    /// dates chrono can hold).
    pub fn next(&self) -> Option<Period> {
        let window = self.window();
        let following = match *self {
            Period::Day(date) => date.succ_opt()?,
            Period::Week { .. } => self.first_day()?.checked_add_days(chrono::Days::new(7))?,
            Period::Month { .. } => self
                .first_day()?
                .checked_add_months(chrono::Months::new(1))?,
            Period::Quarter { .. } => self
                .first_day()?
                .checked_add_months(chrono::Months::new(3))?,
            Period::Year(year) => NaiveDate::from_ymd_opt(year.checked_add(1)?, 1, 1)?,
            Period::All => return None,
        };
        Some(window.period_of(following))
    }

    /// The period of the same window that precedes this one (`None` for `all`).
    pub fn previous(&self) -> Option<Period> {
        let day_before = self.first_day()?.pred_opt()?;
        Some(self.window().period_of(day_before))
    }

    /// The period of the same window a year earlier: the same month, quarter, day of the
    /// year before (29 February goes to the 28th), the same ISO week number (week 53 to 52).
    pub fn year_earlier(&self) -> Option<Period> {
        Some(match *self {
            Period::Day(date) => Period::Day(date.checked_sub_months(chrono::Months::new(12))?),
            Period::Week { iso_year, week } => {
                let earlier = iso_year - 1;
                let week =
                    if NaiveDate::from_isoywd_opt(earlier, week, chrono::Weekday::Mon).is_some() {
                        week
                    } else {
                        52
                    };
                Period::Week {
                    iso_year: earlier,
                    week,
                }
            }
            Period::Month { year, month } => Period::Month {
                year: year - 1,
                month,
            },
            Period::Quarter { year, quarter } => Period::Quarter {
                year: year - 1,
                quarter,
            },
            Period::Year(year) => Period::Year(year - 1),
            Period::All => return None,
        })
    }

    /// The periods from `self` to `to`, both included, in order: empty when `to` comes first
    /// or is of another window.
    pub fn through(self, to: Period) -> impl Iterator<Item = Period> {
        let same_window = self.window() == to.window();
        let mut next = (same_window && self <= to).then_some(self);
        std::iter::from_fn(move || {
            let current = next?;
            next = if current == to { None } else { current.next() };
            Some(current)
        })
    }

    /// How many periods `self.through(to)` yields, counted without walking them (0 when `to`
    /// comes first, is of another window, or either is `all`).
    pub fn count_through(self, to: Period) -> u64 {
        if self.window() != to.window() || self > to {
            return 0;
        }
        let (Some(first), Some(last)) = (self.first_day(), to.first_day()) else {
            return 0;
        };
        let days = (last - first).num_days() as u64;
        match self.window() {
            Window::Day => days + 1,
            Window::Week => days / 7 + 1,
            Window::Month | Window::Quarter | Window::Year => {
                let months = (last.year() - first.year()) as i64 * 12
                    + (last.month() as i64 - first.month() as i64);
                let step = match self.window() {
                    Window::Month => 1,
                    Window::Quarter => 3,
                    _ => 12,
                };
                months as u64 / step + 1
            }
            Window::All => 0,
        }
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

    fn parsed(text: &str) -> Period {
        text.parse().expect("a valid test period")
    }

    fn walk(from: &str, to: &str) -> Vec<String> {
        parsed(from)
            .through(parsed(to))
            .map(|period| period.to_string())
            .collect()
    }

    #[test]
    fn ranges_cross_month_quarter_and_year_ends() {
        assert_eq!(
            walk("2026-11", "2027-02"),
            ["2026-11", "2026-12", "2027-01", "2027-02"]
        );
        assert_eq!(
            walk("2026-Q3", "2027-Q1"),
            ["2026-Q3", "2026-Q4", "2027-Q1"]
        );
        assert_eq!(
            walk("2024-02-28", "2024-03-01"),
            ["2024-02-28", "2024-02-29", "2024-03-01"]
        );
        assert_eq!(
            walk("2026-12-31", "2027-01-01"),
            ["2026-12-31", "2027-01-01"]
        );
        assert_eq!(
            walk("2026-W52", "2027-W02"),
            ["2026-W52", "2026-W53", "2027-W01", "2027-W02"]
        );
        assert_eq!(walk("2025", "2027"), ["2025", "2026", "2027"]);
        assert_eq!(walk("2026-05", "2026-05"), ["2026-05"]);
        assert!(walk("2026-05", "2026-01").is_empty());
        assert!(walk("2026-05", "2026-Q3").is_empty());
    }

    #[test]
    fn counting_a_range_agrees_with_walking_it() {
        for (from, to) in [
            ("2020-01-01", "2026-03-01"),
            ("2020-W01", "2026-W10"),
            ("2015-W53", "2021-W01"),
            ("2001-07", "2026-02"),
            ("2001-Q4", "2026-Q1"),
            ("1999", "2026"),
            ("2026-05", "2026-01"),
        ] {
            assert_eq!(
                parsed(from).count_through(parsed(to)),
                walk(from, to).len() as u64,
                "{from}..{to}"
            );
        }
    }

    #[test]
    fn previous_and_a_year_earlier() {
        assert_eq!(parsed("2027-01").previous(), Some(parsed("2026-12")));
        assert_eq!(parsed("2027-Q1").previous(), Some(parsed("2026-Q4")));
        assert_eq!(parsed("2027-W01").previous(), Some(parsed("2026-W53")));
        assert_eq!(parsed("2024-03-01").previous(), Some(parsed("2024-02-29")));
        assert_eq!(parsed("2026-03").year_earlier(), Some(parsed("2025-03")));
        assert_eq!(
            parsed("2024-02-29").year_earlier(),
            Some(parsed("2023-02-28"))
        );
        assert_eq!(parsed("2026-W53").year_earlier(), Some(parsed("2025-W52")));
        assert_eq!(Period::All.previous(), None);
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
