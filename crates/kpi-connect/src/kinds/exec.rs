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
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tracing::{error, info, warn};

use crate::{ConnectError, Connector, Emit, RunContext, RunOutput, SpendLine};

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

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Message {
    Event {
        event: Value,
    },
    Spend {
        spend: PluginSpend,
    },
    State {
        state: Value,
    },
    Log {
        #[serde(default)]
        level: Option<String>,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginSpend {
    date: NaiveDate,
    amount: Value,
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
            let mut output = RunOutput::default();
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
                let message: Message = serde_json::from_str(&line).map_err(|error| {
                    local(format!(
                        "stdout line {number} is not a protocol message: {error}"
                    ))
                })?;
                match message {
                    Message::Event { event } => output.emits.push(Emit::Envelope(event)),
                    Message::Spend { spend } => {
                        let amount = super::scalar(&spend.amount).ok_or_else(|| {
                            local(format!(
                                "stdout line {number}: spend.amount {} is not a decimal",
                                spend.amount
                            ))
                        })?;
                        output.emits.push(Emit::Spend(SpendLine {
                            date: spend.date,
                            amount,
                            currency: spend.currency,
                            channel: spend.channel,
                            campaign: spend.campaign,
                            category: spend.category,
                            source: spend.source,
                            account: spend.account,
                        }));
                    }
                    Message::State { state } => output.cursor = Some(state),
                    Message::Log { level, message } => match level.as_deref() {
                        Some("error") => error!(connector = %context.connector_id, "{message}"),
                        Some("warn") | Some("warning") => {
                            warn!(connector = %context.connector_id, "{message}")
                        }
                        _ => info!(connector = %context.connector_id, "{message}"),
                    },
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
            r#"read request; echo '{"type":"log","message":"hi"}'; echo '{"type":"spend","spend":{"date":"2026-11-25","amount":12.5,"currency":"EUR","source":"x"}}'; echo "{\"type\":\"state\",\"state\":$(echo "$request" | sed 's/.*"state":\({[^}]*}\).*/\1/')}""#,
            10,
        );
        let output = Connector::run(&plugin, &context()).await.expect("ran");
        assert_eq!(output.cursor, Some(json!({"page": 3})));
        assert_eq!(output.emits.len(), 1);
        let Emit::Spend(line) = &output.emits[0] else {
            panic!("a spend line")
        };
        assert_eq!(line.amount, "12.5");
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
                .contains("stdout line 1 is not a protocol message"),
            "{chatty}"
        );
    }
}
