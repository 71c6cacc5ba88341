//! `csv`: CSV exports from any other tool, from a watched folder (this kind) or once with
//! `kpi import FILE.csv --kind spend|leads|deals`.
//!
//! ## Columns (a header row names them; order is free; unknown columns are an error)
//!
//! - `spend`: **date** (YYYY-MM-DD), **amount**, **currency**, channel, campaign, category,
//!   source (default `csv`), account, reported_at (RFC 3339: when the amount was reported; a
//!   later one replaces an earlier one).
//! - `leads`: **lead_id**, **created_at** (RFC 3339, or YYYY-MM-DD for midnight UTC), channel,
//!   campaign, customer_id, qualified (`true`/`false`/`yes`/`no`/`1`/`0`), qualified_at (when
//!   the qualification was decided: sent as its own `lead.qualified`), stage, stage_at.
//! - `deals`: **deal_id**, **status** (`won` or `lost`), **closed_at**, customer_id, amount,
//!   currency (all three required when won), lead_id, channel, campaign.
//!
//! Every row becomes events whose ids derive from the row's content: importing the same file
//! twice sends nothing new.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use kpi_model::event::SpendCategory;
use kpi_model::EventData;

use crate::{ConnectError, Connector, Coverage, Emit, RunContext, RunOutput, SpendLine};

/// What a CSV file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CsvKind {
    Spend,
    Leads,
    Deals,
}

impl CsvKind {
    pub fn parse(text: &str) -> Option<CsvKind> {
        match text {
            "spend" => Some(CsvKind::Spend),
            "leads" => Some(CsvKind::Leads),
            "deals" => Some(CsvKind::Deals),
            _ => None,
        }
    }

    fn columns(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            CsvKind::Spend => (
                &["date", "amount", "currency"],
                &[
                    "channel",
                    "campaign",
                    "category",
                    "source",
                    "account",
                    "reported_at",
                ],
            ),
            CsvKind::Leads => (
                &["lead_id", "created_at"],
                &[
                    "channel",
                    "campaign",
                    "customer_id",
                    "qualified",
                    "qualified_at",
                    "stage",
                    "stage_at",
                ],
            ),
            CsvKind::Deals => (
                &["deal_id", "status", "closed_at"],
                &[
                    "customer_id",
                    "amount",
                    "currency",
                    "lead_id",
                    "channel",
                    "campaign",
                ],
            ),
        }
    }
}

/// Reads a CSV file into what it says: spend lines and events. `name` names it in errors.
pub fn parse(kind: CsvKind, reader: impl Read, name: &str) -> Result<Vec<Emit>, ConnectError> {
    let bad =
        |line: u64, message: String| ConnectError::Local(format!("{name}, line {line}: {message}"));
    let mut csv = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers: Vec<String> = csv
        .headers()
        .map_err(|error| bad(1, error.to_string()))?
        .iter()
        .map(str::to_ascii_lowercase)
        .collect();
    let (required, optional) = kind.columns();
    for column in &headers {
        if !required.contains(&column.as_str()) && !optional.contains(&column.as_str()) {
            return Err(bad(
                1,
                format!(
                    "unknown column `{column}` (known: {})",
                    [required, optional].concat().join(", ")
                ),
            ));
        }
    }
    for column in required {
        if !headers.iter().any(|header| header == column) {
            return Err(bad(1, format!("column `{column}` is missing")));
        }
    }
    let mut emits = Vec::new();
    for (index, record) in csv.records().enumerate() {
        let line = index as u64 + 2;
        let record = record.map_err(|error| bad(line, error.to_string()))?;
        let row: BTreeMap<&str, &str> = headers
            .iter()
            .map(String::as_str)
            .zip(record.iter())
            .filter(|(_, value)| !value.is_empty())
            .collect();
        let field = |name: &str| row.get(name).map(|value| value.to_string());
        let required =
            |name: &str| field(name).ok_or_else(|| bad(line, format!("`{name}` is empty")));
        let time = |name: &str| -> Result<Option<DateTime<Utc>>, ConnectError> {
            match row.get(name) {
                None => Ok(None),
                Some(text) => parse_time(text).map(Some).ok_or_else(|| {
                    bad(
                        line,
                        format!("`{name}` `{text}` is not an RFC 3339 time or a date"),
                    )
                }),
            }
        };
        // The row's identity and content: the upstream key of its events.
        let row_key = format!(
            "{kind:?}:{}",
            serde_json::to_string(&row).unwrap_or_default()
        );
        match kind {
            CsvKind::Spend => {
                let date_text = required("date")?;
                let date = NaiveDate::parse_from_str(&date_text, "%Y-%m-%d")
                    .map_err(|_| bad(line, format!("`date` `{date_text}` is not YYYY-MM-DD")))?;
                let category = match field("category") {
                    None => SpendCategory::Media,
                    Some(text) => SpendCategory::parse(&text).ok_or_else(|| {
                        bad(
                            line,
                            format!(
                                "`category` `{text}` is not media, tools, prospecting or other"
                            ),
                        )
                    })?,
                };
                emits.push(Emit::Spend(SpendLine {
                    date,
                    amount: crate::amount(&required("amount")?)
                        .map_err(|error| bad(line, error))?,
                    currency: required("currency")?,
                    channel: field("channel"),
                    campaign: field("campaign"),
                    category,
                    source: field("source").unwrap_or_else(|| "csv".into()),
                    account: field("account"),
                    // A reported time dates the amount: a later report of the line wins.
                    reported_at: time("reported_at")?,
                    group: Some(name.to_string()),
                }));
            }
            CsvKind::Leads => {
                let lead_id = required("lead_id")?;
                let created_at =
                    time("created_at")?.ok_or_else(|| bad(line, "`created_at` is empty".into()))?;
                let qualified = match row.get("qualified") {
                    None => None,
                    Some(text) => Some(parse_bool(text).ok_or_else(|| {
                        bad(line, format!("`qualified` `{text}` is not true or false"))
                    })?),
                };
                let qualified_at = time("qualified_at")?;
                emits.push(Emit::Event {
                    time: created_at,
                    upstream_key: row_key.clone(),
                    version: None,
                    data: EventData::LeadCreated {
                        lead_id: lead_id.clone(),
                        channel: field("channel"),
                        campaign: field("campaign"),
                        qualified: qualified.filter(|_| qualified_at.is_none()),
                        customer_id: field("customer_id"),
                    },
                });
                if let Some(at) = qualified_at {
                    emits.push(Emit::Event {
                        time: at,
                        upstream_key: row_key.clone(),
                        version: None,
                        data: EventData::LeadQualified {
                            lead_id: lead_id.clone(),
                            qualified: qualified.unwrap_or(true),
                        },
                    });
                }
                if let Some(stage) = field("stage") {
                    emits.push(Emit::Event {
                        time: time("stage_at")?.unwrap_or(created_at),
                        upstream_key: row_key,
                        version: None,
                        data: EventData::LeadStageChanged { lead_id, stage },
                    });
                }
            }
            CsvKind::Deals => {
                let deal_id = required("deal_id")?;
                let closed_at =
                    time("closed_at")?.ok_or_else(|| bad(line, "`closed_at` is empty".into()))?;
                let status = required("status")?.to_ascii_lowercase();
                let data = match status.as_str() {
                    "won" => EventData::DealWon {
                        deal_id,
                        customer_id: required("customer_id")?,
                        amount: crate::amount(&required("amount")?)
                            .map_err(|error| bad(line, error))?,
                        currency: required("currency")?,
                        lead_id: field("lead_id"),
                        channel: field("channel"),
                        campaign: field("campaign"),
                    },
                    "lost" => EventData::DealLost {
                        deal_id,
                        lead_id: field("lead_id"),
                    },
                    other => {
                        return Err(bad(line, format!("`status` `{other}` is not won or lost")))
                    }
                };
                emits.push(Emit::Event {
                    time: closed_at,
                    upstream_key: row_key,
                    version: None,
                    data,
                });
            }
        }
    }
    Ok(emits)
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|time| time.and_utc())
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Some(true),
        "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// `[connectors.params]` of `csv`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvFolderParams {
    /// The folder to watch; every `*.csv` in it is imported once (again if its content changes).
    pub dir: PathBuf,
    /// What the files hold: `spend`, `leads` or `deals`.
    pub kind: CsvKind,
}

pub struct CsvFolder {
    params: CsvFolderParams,
}

impl CsvFolder {
    fn files(&self) -> Result<Vec<PathBuf>, ConnectError> {
        let entries = std::fs::read_dir(&self.params.dir).map_err(|error| {
            ConnectError::Local(format!(
                "cannot read {}: {error}",
                self.params.dir.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                path.is_file()
                    && path
                        .extension()
                        .is_some_and(|extension| extension.eq_ignore_ascii_case("csv"))
            })
            .collect();
        files.sort();
        Ok(files)
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Connector for CsvFolder {
    type Params = CsvFolderParams;
    const KIND: &'static str = "csv";
    const DESCRIPTION: &'static str =
        "CSV files in a watched folder (spend, leads or deals; documented columns)";

    fn new(params: CsvFolderParams) -> Result<CsvFolder, ConnectError> {
        if params.dir.as_os_str().is_empty() {
            return Err(ConnectError::Config {
                key: "dir".into(),
                message: "must name a folder".into(),
            });
        }
        Ok(CsvFolder { params })
    }

    async fn check(&self, _context: &RunContext) -> Result<String, ConnectError> {
        let files = self.files()?;
        Ok(format!(
            "{} CSV files in {}",
            files.len(),
            self.params.dir.display()
        ))
    }

    async fn run(&self, context: &RunContext) -> Result<RunOutput, ConnectError> {
        // The cursor: file name -> SHA-256 of the content imported.
        let mut imported: BTreeMap<String, String> = context
            .cursor
            .as_ref()
            .and_then(|cursor| serde_json::from_value(cursor.clone()).ok())
            .unwrap_or_default();
        let mut output = RunOutput::default();
        for path in self.files()? {
            let bytes = std::fs::read(&path).map_err(|error| {
                ConnectError::Local(format!("cannot read {}: {error}", path.display()))
            })?;
            let digest: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let name = file_name(&path);
            if imported.get(&name) == Some(&digest) {
                continue;
            }
            output
                .emits
                .extend(parse(self.params.kind, bytes.as_slice(), &name)?);
            // The file's new version holds all its lines: one it no longer has is withdrawn.
            if self.params.kind == CsvKind::Spend {
                output.coverage.push(Coverage::Group(name.clone()));
            }
            imported.insert(name, digest);
        }
        output.cursor = Some(json!(imported));
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deals_map_to_won_and_lost_events() {
        let csv = "deal_id,status,closed_at,customer_id,amount,currency,lead_id\n\
                   D1,won,2026-03-04T10:00:00Z,C1,1250.00,EUR,L1\n\
                   D2,lost,2026-03-05,,,,L2\n";
        let emits = parse(CsvKind::Deals, csv.as_bytes(), "deals.csv").expect("parsed");
        assert_eq!(emits.len(), 2);
        let Emit::Event {
            data: EventData::DealWon {
                amount, lead_id, ..
            },
            ..
        } = &emits[0]
        else {
            panic!("a won deal: {:?}", emits[0])
        };
        assert_eq!(amount.to_string(), "1250");
        assert_eq!(lead_id.as_deref(), Some("L1"));
        let Emit::Event {
            data: EventData::DealLost { .. },
            time,
            ..
        } = &emits[1]
        else {
            panic!("a lost deal: {:?}", emits[1])
        };
        assert_eq!(time.to_rfc3339(), "2026-03-05T00:00:00+00:00");
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let error = parse(
            CsvKind::Deals,
            "deal_id,status,closed_at\nD1,won,2026-03-04\n".as_bytes(),
            "x.csv",
        )
        .expect_err("customer_id missing");
        assert_eq!(error.to_string(), "x.csv, line 2: `customer_id` is empty");
        let error = parse(
            CsvKind::Spend,
            "date,amount,currency,colour\n".as_bytes(),
            "s.csv",
        )
        .expect_err("unknown column");
        assert!(
            error
                .to_string()
                .starts_with("s.csv, line 1: unknown column `colour`"),
            "{error}"
        );
        let error = parse(
            CsvKind::Leads,
            "lead_id,created_at\nL1,yesterday\n".as_bytes(),
            "l.csv",
        )
        .expect_err("bad time");
        assert!(
            error
                .to_string()
                .contains("line 2: `created_at` `yesterday`"),
            "{error}"
        );
    }

    #[test]
    fn the_same_row_gives_the_same_upstream_key() {
        let csv = "lead_id,created_at,channel\nL1,2026-01-02T03:04:05Z,seo\n";
        let first = parse(CsvKind::Leads, csv.as_bytes(), "a.csv").expect("parsed");
        let again = parse(CsvKind::Leads, csv.as_bytes(), "b.csv").expect("parsed");
        assert_eq!(first, again);
    }
}
