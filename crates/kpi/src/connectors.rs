//! `kpi connectors list|check|run` and `kpi import`.

use std::path::Path;
use std::sync::Arc;

use anyhow::bail;
use chrono::NaiveDate;
use indicatif::{ProgressBar, ProgressStyle};
use kpi_config::Config;
use kpi_connect::kinds::csv_folder::CsvKind;
use kpi_connect::kinds::webhook::WebhookReceiver;
use kpi_connect::state::StateBucket;
use kpi_connect::Runner;
use kpi_model::Clock;

/// The connectors' secret values, masked in every log line (an upstream could echo one in an
/// error message).
static SECRETS: std::sync::OnceLock<kpi_connect::secrets::Redactor> = std::sync::OnceLock::new();

fn remember_secrets(runners: &[&Runner]) {
    let secrets = runners
        .iter()
        .flat_map(|runner| runner.secrets().iter().cloned())
        .collect();
    let _ = SECRETS.set(kpi_connect::secrets::Redactor::new(secrets));
}

/// The log writer: standard error, with the connectors' secrets masked. The fmt layer writes
/// each event in one call, so a secret is never split between two writes.
pub struct RedactingStderr;

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        match SECRETS.get() {
            // No connector secret (the common case): no copy of the line.
            Some(redactor) if !redactor.secrets().is_empty() => {
                let text = String::from_utf8_lossy(buffer);
                std::io::stderr().write_all(redactor.redact(&text).as_bytes())?;
            }
            _ => std::io::stderr().write_all(buffer)?,
        }
        Ok(buffer.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Builds every configured connector, failing on the first bad one with its key.
pub fn build_all(config: &Config, clock: Clock) -> anyhow::Result<Vec<Runner>> {
    let env = |name: &str| std::env::var(name).ok();
    let runners = config
        .connectors
        .iter()
        .enumerate()
        .map(|(index, connector)| {
            Runner::from_config(connector, index, &env, clock).map_err(Into::into)
        })
        .collect::<anyhow::Result<Vec<Runner>>>()?;
    remember_secrets(&runners.iter().collect::<Vec<_>>());
    Ok(runners)
}

fn find(config: &Config, id: &str, clock: Clock) -> anyhow::Result<Runner> {
    let env = |name: &str| std::env::var(name).ok();
    let Some((index, connector)) = config
        .connectors
        .iter()
        .enumerate()
        .find(|(_, connector)| connector.id == id)
    else {
        let known: Vec<&str> = config.connectors.iter().map(|c| c.id.as_str()).collect();
        bail!(
            "no connector `{id}` in the configuration (configured: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let runner = Runner::from_config(connector, index, &env, clock)?;
    remember_secrets(&[&runner]);
    Ok(runner)
}

/// The webhook connectors, for the HTTP server.
pub fn webhooks(
    config: &Config,
    metrics: kpi_connect::ConnectorMetrics,
    clock: Clock,
) -> anyhow::Result<WebhookReceiver> {
    let env = |name: &str| std::env::var(name).ok();
    Ok(WebhookReceiver::from_config(
        config,
        &env,
        Some(metrics),
        clock,
    )?)
}

/// The connectors crate's receiver behind the HTTP server's trait.
pub struct WebhookService(pub Arc<WebhookReceiver>);

impl kpi_http::Webhooks for WebhookService {
    fn receive<'a>(
        &'a self,
        connector_id: &'a str,
        signature: Option<&'a str>,
        body: &'a [u8],
    ) -> kpi_http::WebhookReply<'a> {
        Box::pin(async move {
            self.0
                .receive(connector_id, signature, body)
                .await
                .map_err(|refusal| (refusal.status, refusal.message))
        })
    }
}

pub fn list(config: &Config) -> anyhow::Result<()> {
    println!("Connector kinds of this build:");
    for kind in kpi_connect::kinds() {
        println!("  {:<14} {}", kind.name, kind.description);
    }
    println!();
    if config.connectors.is_empty() {
        println!("No connector configured ([[connectors]] in the configuration file).");
        return Ok(());
    }
    println!("Configured connectors:");
    println!(
        "  {:<20} {:<14} {:<16} {:>6} {:>9}",
        "id", "kind", "tenant", "every", "lookback"
    );
    for connector in &config.connectors {
        println!(
            "  {:<20} {:<14} {:<16} {:>6} {:>8}d",
            connector.id,
            connector.kind,
            connector.tenant,
            connector.every,
            connector.lookback_days
        );
    }
    Ok(())
}

pub async fn check(config: &Config, id: &str, clock: Clock) -> anyhow::Result<()> {
    let runner = find(config, id, clock)?;
    if let Some(version) = runner.api_version() {
        match runner.api_sunset() {
            Some(entry) => println!(
                "{id}: API version {version}, switched off on {}{}",
                entry.sunset(),
                if entry.announced { "" } else { " (estimated)" }
            ),
            None => println!("{id}: API version {version}"),
        }
    }
    if let Some(warning) = runner.api_warning() {
        eprintln!("warning: {id}: {warning}");
    }
    match runner.check().await {
        Ok(found) => {
            println!("{id}: ok, {found}");
            Ok(())
        }
        Err(message) => bail!("{id}: {message}"),
    }
}

pub async fn run(
    config: &Config,
    id: &str,
    since: Option<NaiveDate>,
    clock: Clock,
) -> anyhow::Result<()> {
    let runner = find(config, id, clock)?;
    let client = kpi_ingest::connect_command(config).await?;
    let js = async_nats::jetstream::new(client.clone());
    kpi_ingest::ensure_streams(&js, config).await?;
    let states = state_bucket(&js, config, "kpi connectors run").await?;
    let progress = ProgressBar::new(0);
    progress.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} events")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    progress.set_message(format!("{id}: publishing"));
    let report = runner
        .run(
            &js,
            &states,
            since,
            |done, total| {
                progress.set_length(total);
                progress.set_position(done);
            },
            // Ctrl-C stops the run and releases the connector at once.
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await
        .map_err(|error| anyhow::anyhow!("{id}: {}", runner.redact(&error.to_string())))?;
    progress.finish_and_clear();
    client.flush().await?;
    println!(
        "{id}: read {} to {}; published {} events ({} already in the stream), {} spend lines unchanged, {} withdrawn, {} leads and deals unchanged",
        report.window.since,
        report.window.until,
        report.published,
        report.duplicates,
        report.unchanged,
        report.withdrawn,
        report.unchanged_events
    );
    Ok(())
}

async fn state_bucket(
    js: &async_nats::jetstream::Context,
    config: &Config,
    by: &str,
) -> anyhow::Result<StateBucket> {
    Ok(StateBucket::open(
        js,
        &config.nats.connector_state_bucket,
        config.nats.replicas,
        by,
    )
    .await?)
}

/// `kpi connectors state ID`: what the connector saved, and who holds it.
pub async fn state(config: &Config, id: &str, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.connectors.iter().any(|c| c.id == id),
        "no connector `{id}` in the configuration"
    );
    let client = kpi_ingest::connect_command(config).await?;
    let js = async_nats::jetstream::new(client);
    let states = state_bucket(&js, config, "kpi connectors state").await?;
    let Some((manifest, bytes)) = states.read(id).await? else {
        println!("{id}: no saved state (its next run reads from scratch)");
        return Ok(());
    };
    if json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    match manifest.saved_at {
        Some(at) => println!(
            "{id}: state saved {} in {} (generation {}, {} bytes)",
            at.to_rfc3339(),
            states.name(),
            manifest.generation,
            manifest.bytes
        ),
        None => println!("{id}: no saved state yet"),
    }
    if !bytes.is_empty() {
        for line in kpi_connect::runner::describe_state(&bytes)? {
            println!("  {line}");
        }
    }
    match &manifest.lease {
        Some(lease) => println!(
            "  held by {} ({}) since {}, lease until {}",
            lease.by,
            lease.owner,
            lease.since.to_rfc3339(),
            lease.until.to_rfc3339()
        ),
        None => println!("  not running"),
    }
    Ok(())
}

/// `kpi connectors reset ID`: forgets the connector's state; its next run reads from scratch
/// (the first-run window, or everything for CRM kinds), which re-sends nothing that counts
/// twice (event ids are deterministic).
pub async fn reset(config: &Config, id: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.connectors.iter().any(|c| c.id == id),
        "no connector `{id}` in the configuration"
    );
    let client = kpi_ingest::connect_command(config).await?;
    let js = async_nats::jetstream::new(client);
    let states = state_bucket(&js, config, "kpi connectors reset").await?;
    if states.reset(id).await? {
        println!("{id}: state forgotten; its next run reads from scratch");
    } else {
        println!("{id}: had no saved state");
    }
    Ok(())
}

pub async fn import(
    config: &Config,
    file: &Path,
    kind: &str,
    tenant: &str,
    clock: Clock,
) -> anyhow::Result<()> {
    let Some(kind) = CsvKind::parse(kind) else {
        bail!("--kind must be spend, leads or deals");
    };
    anyhow::ensure!(
        kpi_model::event::is_valid_tenant(tenant),
        "--tenant `{tenant}` is not [a-z0-9_-]{{1,64}}"
    );
    let events = kpi_connect::runner::import_events(kind, file, tenant, clock.now())?;
    let summary =
        crate::publish::publish_events(config, events, &file.display().to_string()).await?;
    println!(
        "imported {}: {} events published ({} already in the stream)",
        file.display(),
        summary.stored,
        summary.duplicates
    );
    Ok(())
}
