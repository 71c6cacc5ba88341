//! `exec`: an external plugin in any language, in the spirit of Singer taps.
//!
//! ## Protocol
//!
//! The engine starts `command` with `args` (no shell), writes one JSON request on its stdin and
//! closes it:
//!
//! ```json
//! {"connector":"shop","tenant":"acme","since":"2026-11-12","until":"2026-11-26",
//!  "state":{"page":3},"params":{...the connector's params.settings...}}
//! ```
//!
//! and reads JSON lines on its stdout, one message per line:
//!
//! - `{"type":"event","event":{...a SPEC envelope with a deterministic id...}}`
//! - `{"type":"spend","spend":{"date":"2026-11-25","amount":"12.50","currency":"EUR",
//!   "channel":"social","campaign":"x","category":"media","source":"shop","account":"a"}}`:
//!   a spend line, versioned by the engine like the built-in kinds' (sent again only when the
//!   amount changes);
//! - `{"type":"state","state":{...}}`: the cursor for the next run (the last one wins; saved
//!   only if the run succeeds);
//! - `{"type":"log","level":"info|warn|error","message":"..."}`.
//!
//! stderr is logged line by line. The run fails if the program exits non-zero, writes a line
//! that is not one of these, or runs longer than `timeout_s` (it is then killed).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chrono::NaiveDate;
use kpi_model::event::{SpendCategory, EVENTS_SUBJECT_PREFIX};
use kpi_model::{decode_event, DecodeLimits, Event};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tracing::{error, info, warn};

use crate::{ConnectError, Connector, Coverage, Emit, RunContext, RunOutput, SpendLine};

/// `[connectors.params]` of `exec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// The program (a path, or a name looked up in `PATH`).
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Working directory of the program.
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    /// Longest a run may take.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Passed to the program as `params` in its request.
    #[serde(default)]
    pub settings: Map<String, Value>,
}

fn default_timeout_s() -> u64 {
    300
}

pub struct Exec {
    params: ExecParams,
}

/// One line of the plugin's output. Events and spend lines are kept as raw JSON, so that
/// their amounts are read digit by digit.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    spend: Option<&'a RawValue>,
    #[serde(default)]
    state: Option<Value>,
    #[serde(default)]
    level: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct EventType {
    #[serde(rename = "type", default)]
    event_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginSpend<'a> {
    date: NaiveDate,
    #[serde(borrow)]
    amount: &'a RawValue,
    currency: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    campaign: Option<String>,
    #[serde(default)]
    category: Option<String>,
    source: String,
    #[serde(default)]
    account: Option<String>,
}

impl Exec {
    async fn invoke(&self, context: &RunContext, check: bool) -> Result<RunOutput, ConnectError> {
        let request = json!({
            "connector": context.connector_id,
            "tenant": context.tenant,
            "since": context.window.since.to_string(),
            "until": context.window.until.to_string(),
            "state": context.cursor,
            "params": self.params.settings,
            "check": check,
        });
        let mut command = Command::new(&self.params.command);
        command
            .args(&self.params.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &self.params.working_dir {
            command.current_dir(dir);
        }
        let local =
            |message: String| ConnectError::Local(format!("{}: {message}", self.params.command));
        let mut child = command
            .spawn()
            .map_err(|error| local(format!("cannot start: {error}")))?;
        let mut stdin = child.stdin.take().ok_or_else(|| local("no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| local("no stdout".into()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| local("no stderr".into()))?;
        let connector = context.connector_id.clone();
        let stderr_task = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut last = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                warn!(connector = %connector, stderr = %line, "plugin stderr");
                last = line;
            }
            last
        });

        let work = async {
            let mut body = request.to_string();
            body.push('\n');
            // A plugin that does not read its request is not an error.
            let _ = stdin.write_all(body.as_bytes()).await;
            drop(stdin);
            // A plugin's spend lines are all its lines of the window's days (one missing is
            // withdrawn), unless it says it reports spend partially.
            let mut output = RunOutput {
                coverage: vec![Coverage::Window],
                ..RunOutput::default()
            };
            let mut lines = BufReader::new(stdout).lines();
            let mut number = 0;
            while let Some(line) = lines
                .next_line()
                .await
                .map_err(|error| local(format!("reading stdout: {error}")))?
            {
                number += 1;
                if line.trim().is_empty() {
                    continue;
                }
                let bad = |what: String| local(format!("stdout line {number}: {what}"));
                let message: Message = serde_json::from_str(&line)
                    .map_err(|error| bad(format!("not a protocol message: {error}")))?;
                match (message.kind.as_str(), message.event, message.spend) {
                    ("event", Some(raw), _) => output
                        .emits
                        .push(Emit::External(plugin_event(context, raw).map_err(bad)?)),
                    ("spend", _, Some(raw)) => output
                        .emits
                        .push(Emit::Spend(plugin_spend(raw).map_err(bad)?)),
                    ("state", _, _) => output.cursor = message.state,
                    ("spend_partial", _, _) => output.coverage.clear(),
                    ("log", _, _) => {
                        let text = message.message.unwrap_or_default();
                        match message.level.as_deref() {
                            Some("error") => error!(connector = %context.connector_id, "{text}"),
                            Some("warn") | Some("warning") => {
                                warn!(connector = %context.connector_id, "{text}")
                            }
                            _ => info!(connector = %context.connector_id, "{text}"),
                        }
                    }
                    (kind, _, _) => {
                        return Err(bad(format!(
                            "`{}` is not a message type (event, spend, spend_partial, state, log) with its field",
                            kpi_model::event::shown(kind)
                        )))
                    }
                }
            }
            let status = child
                .wait()
                .await
                .map_err(|error| local(format!("waiting: {error}")))?;
            Ok::<_, ConnectError>((output, status))
        };
        let timeout = Duration::from_secs(self.params.timeout_s);
        let (output, status) = match tokio::time::timeout(timeout, work).await {
            Ok(result) => result?,
            Err(_) => {
                // `kill_on_drop` ends the process with the dropped future.
                return Err(local(format!(
                    "timed out after {} s; killed",
                    self.params.timeout_s
                )));
            }
        };
        let last_stderr = stderr_task.await.unwrap_or_default();
        if !status.success() {
            return Err(local(format!(
                "exited with {status}{}",
                if last_stderr.is_empty() {
                    String::new()
                } else {
                    format!(": {last_stderr}")
                }
            )));
        }
        Ok(output)
    }
}

/// A plugin's event: decoded and checked as the engine will, for the connector's tenant.
fn plugin_event(context: &RunContext, raw: &RawValue) -> Result<Event, String> {
    let event_type = serde_json::from_str::<EventType>(raw.get())
        .ok()
        .and_then(|only| only.event_type)
        .ok_or_else(|| "event: `type` is missing".to_string())?;
    let subject = format!("{EVENTS_SUBJECT_PREFIX}{}.{event_type}", context.tenant);
    decode_event(
        &subject,
        raw.get().as_bytes(),
        context.now,
        &DecodeLimits::default(),
    )
    .map_err(|rejection| format!("event: {rejection}"))
}

/// A plugin's spend line, its amount read exactly.
fn plugin_spend(raw: &RawValue) -> Result<SpendLine, String> {
    let spend: PluginSpend =
        serde_json::from_str(raw.get()).map_err(|error| format!("spend: {error}"))?;
    let amount = kpi_model::money::parse_amount_json(spend.amount.get()).map_err(|error| {
        format!(
            "spend.amount {}: {error}",
            kpi_model::event::shown(spend.amount.get())
        )
    })?;
    let category = match spend.category.as_deref() {
        None => SpendCategory::Media,
        Some(text) => SpendCategory::parse(text).ok_or_else(|| {
            format!(
                "spend.category `{}` is not media, tools, prospecting or other",
                kpi_model::event::shown(text)
            )
        })?,
    };
    Ok(SpendLine {
        date: spend.date,
        amount,
        currency: spend.currency,
        channel: spend.channel,
        campaign: spend.campaign,
        category,
        source: spend.source,
        account: spend.account,
        reported_at: None,
        group: None,
    })
}

impl Connector for Exec {
    type Params = ExecParams;
    const KIND: &'static str = "exec";
    const DESCRIPTION: &'static str =
        "External plugin: runs a program that prints events, spend lines and state as JSON lines";

    fn new(params: ExecParams) -> Result<Exec, ConnectError> {
        if params.command.trim().is_empty() {
            return Err(ConnectError::Config {
                key: "command".into(),
                message: "must name a program".into(),
            });
        }
        if params.timeout_s == 0 {
            return Err(ConnectError::Config {
                key: "timeout_s".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(Exec { params })
    }

    async fn check(&self, context: &RunContext) -> Result<String, ConnectError> {
        let output = self.invoke(context, true).await?;
        Ok(format!(
            "{} ran and printed {} events",
            self.params.command,
            output.emits.len()
        ))
    }

    async fn run(&self, context: &RunContext) -> Result<RunOutput, ConnectError> {
        self.invoke(context, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Window;
    use kpi_model::EventData;

    fn context() -> RunContext {
        let today = chrono::NaiveDate::from_ymd_opt(2026, 12, 31).expect("a date");
        RunContext {
            connector_id: "plugin".into(),
            tenant: "acme".into(),
            window: Window {
                since: today,
                until: today,
            },
            cursor: Some(json!({"page": 3})),
            now: today.and_hms_opt(23, 59, 59).expect("a time").and_utc(),
        }
    }

    fn shell(script: &str, timeout_s: u64) -> Exec {
        Exec::new(ExecParams {
            command: "sh".into(),
            args: vec!["-c".into(), script.into()],
            working_dir: None,
            timeout_s,
            settings: Map::new(),
        })
        .expect("valid params")
    }

    #[tokio::test]
    async fn messages_are_read_and_the_request_carries_the_state() {
        // The plugin echoes the state it was given as its new state.
        let plugin = shell(
            r#"read request; echo '{"type":"log","message":"hi"}'; echo '{"type":"spend","spend":{"date":"2026-11-25","amount":12.500000000000000001,"currency":"EUR","source":"x"}}'; echo '{"type":"event","event":{"specversion":"1.0","id":"p-1","source":"shop","type":"deal.won","time":"2026-11-25T10:00:00Z","data":{"deal_id":"D1","customer_id":"C1","amount":0.125000000000000001,"currency":"EUR"}}}'; echo "{\"type\":\"state\",\"state\":$(echo "$request" | sed 's/.*"state":\({[^}]*}\).*/\1/')}""#,
            10,
        );
        let output = Connector::run(&plugin, &context()).await.expect("ran");
        assert_eq!(output.cursor, Some(json!({"page": 3})));
        assert_eq!(output.emits.len(), 2);
        let Emit::Spend(line) = &output.emits[0] else {
            panic!("a spend line")
        };
        // JSON numbers keep every digit the plugin wrote.
        assert_eq!(line.amount.to_string(), "12.500000000000000001");
        let Emit::External(event) = &output.emits[1] else {
            panic!("an event")
        };
        assert_eq!(event.tenant, "acme");
        let EventData::DealWon { amount, .. } = &event.data else {
            panic!("a won deal")
        };
        assert_eq!(amount.to_string(), "0.125000000000000001");
    }

    #[tokio::test]
    async fn an_event_the_engine_would_reject_fails_the_run_naming_line_and_field() {
        let plugin = shell(
            r#"echo '{"type":"event","event":{"specversion":"1.0","id":"p-1","source":"shop","type":"deal.won","time":"2026-11-25T10:00:00Z","data":{"deal_id":"D1","customer_id":"C1","amount":"-3","currency":"EUR"}}}'"#,
            10,
        );
        let error = Connector::run(&plugin, &context())
            .await
            .expect_err("negative amount");
        assert!(
            error
                .to_string()
                .contains("stdout line 1: event: negative_amount: data.amount: -3 is negative"),
            "{error}"
        );
        let other_tenant = shell(
            r#"echo '{"type":"event","event":{"specversion":"1.0","id":"p-2","source":"shop","type":"deal.lost","tenant":"beta","time":"2026-11-25T10:00:00Z","data":{"deal_id":"D1"}}}'"#,
            10,
        );
        let error = Connector::run(&other_tenant, &context())
            .await
            .expect_err("another tenant");
        assert!(error.to_string().contains("tenant_mismatch"), "{error}");
    }

    #[tokio::test]
    async fn a_failing_slow_or_chatty_plugin_fails_the_run_with_why() {
        let failing = Connector::run(&shell("echo 'no token' >&2; exit 3", 10), &context())
            .await
            .expect_err("exit 3");
        assert!(
            failing.to_string().contains("exit status: 3: no token"),
            "{failing}"
        );
        let slow = Connector::run(&shell("sleep 5", 1), &context())
            .await
            .expect_err("timeout");
        assert!(
            slow.to_string().contains("timed out after 1 s; killed"),
            "{slow}"
        );
        let chatty = Connector::run(&shell("echo hello", 10), &context())
            .await
            .expect_err("not a message");
        assert!(
            chatty
                .to_string()
                .contains("stdout line 1: not a protocol message"),
            "{chatty}"
        );
    }
}
