//! The API versions the ad-platform kinds call, and when each is switched off.
//!
//! Google Ads, Meta and LinkedIn version their APIs and switch each version off about a year
//! after its release: a connector left on an old version stops working on a known day. Each
//! kind's default is the newest version its platform supports as of this release; this table
//! gives the sunset date of that version and of recent ones a configuration may still name, so
//! that `kpi connectors check` warns (past, or within [`WARN_DAYS`] days), the engine logs it at
//! start, and `kpi_connector_api_sunset_timestamp_seconds{connector}` lets an alert fire ahead
//! of the day (`KpiConnectorApiSunsetSoon` in `deploy/prometheus/rules`).
//!
//! Sources, read on 2026-12-01:
//! - Google Ads API: "Sunset dates" (<https://developers.google.com/google-ads/api/docs/sunset-dates>),
//!   which recommends starting with v26; the sunset reminders on the Google Ads developer blog
//!   (v21: 2026-08-05, v22: 2026-10-07); and the release schedule of
//!   <https://ads-developers.googleblog.com/2025/09/more-frequent-releases-coming-for.html>
//!   (v23: February 2027, v24: May 2027, v25: August 2027, v26: November 2027, "may be
//!   adjusted"): a projected month is entered as its first day.
//! - Meta Marketing API: "Marketing API versions"
//!   (<https://developers.facebook.com/docs/marketing-api/marketing-api-changelog/versions>):
//!   v23.0 expired 2026-06-09, v24.0 2026-11-10, v25.0 expires 2027-02-23; v26.0 (2026-07-29)
//!   and v27.0 (2026-11-04) are "TBD". Their dates here are estimates, one year after release
//!   as for the versions before, and marked as such. The Graph API keeps versions longer, but
//!   insights are Marketing API endpoints.
//! - LinkedIn Marketing API: "Versioning" (<https://learn.microsoft.com/linkedin/marketing/versioning>:
//!   "supported and stable for a minimum of one year") and the migrations table of
//!   <https://learn.microsoft.com/linkedin/marketing/integrations/migrations> (202510:
//!   2026-10-15, 202511: 2026-11-16, 202601: 2027-01-15, 202602: 2027-02-15, 202603:
//!   2027-03-16). 202608 is the newest version published ("August 2026 - Version 202608
//!   (Latest)" in <https://learn.microsoft.com/linkedin/marketing/integrations/recent-changes>);
//!   its date is an estimate, a year after release.

use chrono::NaiveDate;

/// How long before a sunset `kpi connectors check` and the start-up log warn.
pub const WARN_DAYS: i64 = 60;

/// One version of a platform's API and the day it stops answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiVersion {
    pub kind: &'static str,
    pub version: &'static str,
    /// (year, month, day) of the sunset.
    sunset: (i32, u32, u32),
    /// A day the platform published; `false`: a projected month (Google's schedule) or an
    /// estimate (not announced yet).
    pub announced: bool,
}

impl ApiVersion {
    pub fn sunset(&self) -> NaiveDate {
        let (year, month, day) = self.sunset;
        NaiveDate::from_ymd_opt(year, month, day).unwrap_or(NaiveDate::MAX)
    }
}

const fn version(
    kind: &'static str,
    version: &'static str,
    sunset: (i32, u32, u32),
    announced: bool,
) -> ApiVersion {
    ApiVersion {
        kind,
        version,
        sunset,
        announced,
    }
}

/// Versions by kind, oldest first; the last of each kind is its default.
pub const VERSIONS: &[ApiVersion] = &[
    version("google_ads", "v21", (2026, 8, 5), true),
    version("google_ads", "v22", (2026, 10, 7), true),
    version("google_ads", "v23", (2027, 2, 1), false),
    version("google_ads", "v24", (2027, 5, 1), false),
    version("google_ads", "v25", (2027, 8, 1), false),
    version("google_ads", "v26", (2027, 11, 1), false),
    version("meta_ads", "v22.0", (2026, 2, 19), true),
    version("meta_ads", "v23.0", (2026, 6, 9), true),
    version("meta_ads", "v24.0", (2026, 11, 10), true),
    version("meta_ads", "v25.0", (2027, 2, 23), true),
    version("meta_ads", "v26.0", (2027, 7, 29), false),
    version("meta_ads", "v27.0", (2027, 11, 4), false),
    version("linkedin_ads", "202508", (2026, 8, 17), true),
    version("linkedin_ads", "202510", (2026, 10, 15), true),
    version("linkedin_ads", "202511", (2026, 11, 16), true),
    version("linkedin_ads", "202601", (2027, 1, 15), true),
    version("linkedin_ads", "202602", (2027, 2, 15), true),
    version("linkedin_ads", "202603", (2027, 3, 16), true),
    version("linkedin_ads", "202608", (2027, 8, 15), false),
];

/// The version a kind calls when its `api_version` is not set.
pub fn default_version(kind: &str) -> Option<&'static str> {
    VERSIONS
        .iter()
        .rev()
        .find(|entry| entry.kind == kind)
        .map(|entry| entry.version)
}

/// What the table knows of `version` of `kind`.
pub fn lookup(kind: &str, version: &str) -> Option<ApiVersion> {
    VERSIONS
        .iter()
        .find(|entry| entry.kind == kind && entry.version == version)
        .copied()
}

/// A warning for `version` of `kind` on `today`, when it is past or within [`WARN_DAYS`] of
/// its sunset, or unknown to this build.
pub fn warning(kind: &str, version: &str, today: NaiveDate) -> Option<String> {
    let Some(entry) = lookup(kind, version) else {
        return Some(format!(
            "API version {version} is not one this build knows the sunset of; the default is {}",
            default_version(kind).unwrap_or("?")
        ));
    };
    let sunset = entry.sunset();
    let left = (sunset - today).num_days();
    let estimated = if entry.announced {
        ""
    } else {
        " (projected or estimated: the exact day is not announced yet)"
    };
    if left < 0 {
        Some(format!(
            "API version {version} was switched off on {sunset}{estimated}: set api_version to {} (or remove it for the default)",
            default_version(kind).unwrap_or("?")
        ))
    } else if left <= WARN_DAYS {
        Some(format!(
            "API version {version} is switched off on {sunset}{estimated}, in {left} days: move to {}",
            default_version(kind).unwrap_or("?")
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").expect("a date")
    }

    #[test]
    fn defaults_are_the_newest_versions_and_none_is_past_its_sunset_at_release() {
        assert_eq!(default_version("google_ads"), Some("v26"));
        assert_eq!(default_version("meta_ads"), Some("v27.0"));
        assert_eq!(default_version("linkedin_ads"), Some("202608"));
        assert_eq!(default_version("hubspot"), None);
        for kind in ["google_ads", "meta_ads", "linkedin_ads"] {
            let default = default_version(kind).expect("a default");
            assert_eq!(warning(kind, default, day("2026-12-01")), None, "{kind}");
        }
    }

    #[test]
    fn a_version_is_warned_of_sixty_days_ahead_and_past_its_sunset() {
        // Google Ads v21 was switched off on 2026-08-05.
        let past = warning("google_ads", "v21", day("2026-12-01")).expect("a warning");
        assert!(
            past.contains("was switched off on 2026-08-05") && past.contains("v26"),
            "{past}"
        );
        // Meta v25.0 ends 2027-02-23: quiet on 2026-12-24, warned from 2026-12-25.
        assert_eq!(warning("meta_ads", "v25.0", day("2026-12-24")), None);
        let soon = warning("meta_ads", "v25.0", day("2026-12-25")).expect("a warning");
        assert!(soon.contains("in 60 days"), "{soon}");
        // An estimate says so.
        let estimated = warning("meta_ads", "v26.0", day("2027-07-01")).expect("a warning");
        assert!(estimated.contains("estimated"), "{estimated}");
        // A version this build does not know.
        assert!(warning("linkedin_ads", "209901", day("2026-12-01"))
            .expect("a warning")
            .contains("not one this build knows"));
    }
}
