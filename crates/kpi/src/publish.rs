//! `kpi publish`: events from a JSON-lines file to JetStream, each with `Nats-Msg-Id` set to
//! its `id`, acknowledged by the stream before the command ends.

use std::io::BufRead;
use std::path::Path;

use anyhow::Context;
use async_nats::jetstream;
use indicatif::{ProgressBar, ProgressStyle};
use kpi_config::Config;
use kpi_model::event::{is_valid_tenant, EVENTS_SUBJECT_PREFIX};
use kpi_model::{decode_event, DecodeLimits, EventData};
use serde_json::Value;

pub use kpi_connect::sink::{publish_all, Outgoing};

/// What a publish did.
#[derive(Debug, Default)]
pub struct PublishSummary {
    pub stored: u64,
    pub duplicates: u64,
}

/// What `kpi publish` checks each line against: the engine's own decoder and the tenants'
/// exchange rates, so that a file is refused (line and field named) before anything of it is
/// published, rather than landing half in the dead-letter stream.
pub struct LineChecks {
    pub default_tenant: String,
    pub tenants: kpi_model::Tenants,
    pub limits: DecodeLimits,
    pub now: chrono::DateTime<chrono::Utc>,
}

#[derive(serde::Deserialize)]
struct Routing {
    #[serde(rename = "type", default)]
    event_type: Option<Value>,
    #[serde(default)]
    tenant: Option<Value>,
}

/// One JSON event line, decoded and checked, as it is published: its subject from its
/// `tenant` (or the default) and `type`, its `id` as `Nats-Msg-Id`.
pub fn outgoing_from_line(
    line: &str,
    checks: &LineChecks,
    line_number: usize,
) -> anyhow::Result<Outgoing> {
    let routing: Routing =
        serde_json::from_str(line).with_context(|| format!("line {line_number}: not JSON"))?;
    let Some(Value::String(event_type)) = routing.event_type else {
        anyhow::bail!("line {line_number}: field `type` is missing");
    };
    let tenant = match &routing.tenant {
        Some(Value::String(tenant)) => tenant.as_str(),
        _ => checks.default_tenant.as_str(),
    };
    anyhow::ensure!(
        is_valid_tenant(tenant),
        "line {line_number}: tenant `{}` is not [a-z0-9_-]{{1,64}}",
        kpi_model::event::shown(tenant)
    );
    let subject = format!("{EVENTS_SUBJECT_PREFIX}{tenant}.{event_type}");
    let event = decode_event(&subject, line.as_bytes(), checks.now, &checks.limits)
        .map_err(|rejection| anyhow::anyhow!("line {line_number}: {rejection}"))?;
    if let EventData::DealWon {
        amount, currency, ..
    }
    | EventData::SpendReported {
        amount, currency, ..
    } = &event.data
    {
        checks
            .tenants
            .get(tenant)
            .to_reporting(*amount, currency)
            .map_err(|rejection| anyhow::anyhow!("line {line_number}: {rejection}"))?;
    }
    Ok(Outgoing::from_event(&event))
}

pub async fn publish_file(
    config: &Config,
    file: &Path,
    default_tenant: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let checks = LineChecks {
        default_tenant: default_tenant.to_string(),
        tenants: config.tenants(),
        limits: config.decode_limits(),
        now,
    };
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
        events.push(outgoing_from_line(&line, &checks, index + 1)?);
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
    // The same connection as `kpi serve`'s: its servers, credentials and time-outs.
    let client = kpi_ingest::connect_command(config).await?;
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
