//! `kpi publish`: events from a JSON-lines file to JetStream, each with `Nats-Msg-Id` set to
//! its `id`, acknowledged by the stream before the command ends.

use std::io::BufRead;
use std::path::Path;

use anyhow::Context;
use async_nats::jetstream;
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use kpi_config::Config;
use kpi_model::event::{is_valid_tenant, EVENTS_SUBJECT_PREFIX};
use serde_json::Value;

pub use kpi_connect::sink::{publish_all, Outgoing};

/// What a publish did.
#[derive(Debug, Default)]
pub struct PublishSummary {
    pub stored: u64,
    pub duplicates: u64,
}

/// The subject of one JSON event line: its `tenant` (or the default) and its `type`.
pub fn outgoing_from_line(
    line: &str,
    default_tenant: &str,
    line_number: usize,
) -> anyhow::Result<Outgoing> {
    let value: Value =
        serde_json::from_str(line).with_context(|| format!("line {line_number}: not JSON"))?;
    let event_type = value
        .get("type")
        .and_then(Value::as_str)
        .with_context(|| format!("line {line_number}: field `type` is missing"))?;
    let tenant = value
        .get("tenant")
        .and_then(Value::as_str)
        .unwrap_or(default_tenant);
    anyhow::ensure!(
        is_valid_tenant(tenant),
        "line {line_number}: tenant `{tenant}` is not [a-z0-9_-]{{1,64}}"
    );
    anyhow::ensure!(
        !event_type.is_empty() && !event_type.contains(['*', '>', ' ']),
        "line {line_number}: field `type` cannot be part of a subject"
    );
    Ok(Outgoing {
        subject: format!("{EVENTS_SUBJECT_PREFIX}{tenant}.{event_type}"),
        id: value.get("id").and_then(Value::as_str).map(str::to_string),
        payload: Bytes::from(line.to_string()),
    })
}

pub async fn publish_file(
    config: &Config,
    file: &Path,
    default_tenant: &str,
) -> anyhow::Result<()> {
    let reader: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
        ))
    };
    let mut events = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        events.push(outgoing_from_line(&line, default_tenant, index + 1)?);
    }
    let summary = publish_events(config, events, &file.display().to_string()).await?;
    println!(
        "published {} events ({} already in the stream)",
        summary.stored, summary.duplicates
    );
    Ok(())
}

/// Publishes with at most a few thousand acknowledgements outstanding.
pub async fn publish_events(
    config: &Config,
    events: Vec<Outgoing>,
    what: &str,
) -> anyhow::Result<PublishSummary> {
    let client = async_nats::ConnectOptions::new()
        .name("kpi-publish")
        .connect(config.nats.url.as_str())
        .await
        .with_context(|| format!("cannot connect to NATS at {}", config.nats.url))?;
    let js = jetstream::new(client.clone());
    kpi_ingest::ensure_streams(&js, config).await?;

    let progress = ProgressBar::new(events.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} events, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    progress.set_message(what.to_string());
    let mut summary = PublishSummary::default();
    publish_all(&js, events, |duplicate| {
        if duplicate {
            summary.duplicates += 1;
        } else {
            summary.stored += 1;
        }
        progress.inc(1);
    })
    .await
    .map_err(anyhow::Error::msg)?;
    progress.finish_and_clear();
    client.flush().await?;
    Ok(summary)
}
