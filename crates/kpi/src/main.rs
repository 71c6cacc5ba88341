//! `kpi`: the KPI engine's one binary.
//!
//! - `kpi serve` runs the engine (JetStream consumer, store, HTTP server);
//! - `kpi publish FILE.jsonl` publishes events;
//! - `kpi report` prints a tenant's KPI table from a running engine;
//! - `kpi demo` publishes a realistic two-year SME history;
//! - `kpi connectors list|check|run` operates the connectors; `kpi import` publishes a CSV.

mod connectors;
mod report;
mod serve;

use kpi::{demo, publish};

// The engine allocates many small, short-lived objects per event (sled nodes, records,
// aggregate keys); mimalloc serves them markedly faster than glibc's allocator (see
// BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` (its place in mimalloc's `mi_option_e`, the same in v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc keeps freed pages for `purge_delay` (one second in v3) before returning them to
/// the system. The ingest frees a whole working set at every checkpoint; with the delay, peak
/// RSS was about 90 MiB higher at the same ingest rate (BENCHMARKS.md). `MIMALLOC_PURGE_DELAY`
/// in the environment still wins.
#[allow(unsafe_code)]
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kpi",
    version,
    about = "Event-driven marketing KPI engine (CAC, conversion, retention, ROI, qualified leads)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine: consume events from JetStream, keep the KPIs, serve /metrics and the API.
    Serve {
        /// Configuration file (TOML), layered over config/default.toml and under KPI__* variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Publish events from a JSON-lines file (one CloudEvents envelope per line).
    Publish {
        /// The file; `-` reads standard input.
        file: PathBuf,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Tenant of events that carry no `tenant` field.
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Print KPI tables of a tenant: one period per channel and campaign (default), a trend
    /// with one row per period (--trend), or retention and loyalty by year (--retention).
    Report {
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Period: YYYY-MM-DD, YYYY-Www, YYYY-MM, YYYY-Qn, YYYY or all (default: this month).
        /// With --trend, the last period of the trend (default: the current one); with
        /// --retention, a year.
        #[arg(long)]
        period: Option<String>,
        /// One row per period of this granularity: day, week, month, quarter or year.
        #[arg(long, value_name = "GRANULARITY", conflicts_with = "retention")]
        trend: Option<String>,
        /// Retention and loyalty (2 to 5 years in a row) by year.
        #[arg(long)]
        retention: bool,
        /// How many periods (or years) the trend or retention table shows.
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=400))]
        last: u32,
        /// The trend of one channel instead of all channels.
        #[arg(long, requires = "trend", conflicts_with = "campaign")]
        channel: Option<String>,
        /// The trend of one campaign.
        #[arg(long, requires = "trend")]
        campaign: Option<String>,
        /// Base URL of the engine's HTTP server (default: from the configuration's http.listen).
        #[arg(long)]
        url: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the API's JSON instead of a table.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Print CSV (one header line, full-precision numbers, empty cells for undefined KPIs).
        #[arg(long)]
        csv: bool,
    },
    /// Connector plugins: list the kinds and the configured connectors, check one, run one.
    Connectors {
        #[command(subcommand)]
        command: ConnectorsCommand,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// The configuration: check it as `serve` would (connector params, secrets, TLS files
    /// included) and print the effective settings with secrets masked.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Multi-engine mode: `migrate` makes a single engine's event stream partitioned, its
    /// history kept (README, "Moving to several engines").
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Publish a CSV export (spend, leads or deals; columns in the README).
    Import {
        file: PathBuf,
        /// What the file holds: spend, leads or deals.
        #[arg(long)]
        kind: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Publish a realistic SME history: six years (by default), six channels, campaigns,
    /// restated spend, repeat customers, cancelled deals and a few invalid events.
    Demo {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Leads per day on average (today; the company grows, so fewer in the early years).
        #[arg(long, default_value_t = 12)]
        leads_per_day: u32,
        /// Years of history before the current month.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=30))]
        years: u32,
        /// Write the events to this JSON-lines file instead of publishing them.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Random seed (the same seed gives the same history).
        #[arg(long, default_value_t = 2026)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate everything `kpi serve` would, print the effective configuration (defaults,
    /// file and KPI__* variables merged, secrets masked); exit 1 naming every bad key.
    Check,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Partition the event stream (`nats.stream`) into `cluster.partitions`, in place: every
    /// event stored so far is kept, under its tenant's partition, and the single engine's
    /// consumer deleted. Stop the engine first; run it again if it was interrupted.
    Migrate,
}

#[derive(Subcommand)]
enum ConnectorsCommand {
    /// The connector kinds of this build and the configured connectors.
    List,
    /// Check a connector's credentials and reachability.
    Check { id: String },
    /// Run a connector once in the foreground (also while `kpi serve` runs; refused while a
    /// scheduled run of it is in progress).
    Run {
        id: String,
        /// Read from this day (YYYY-MM-DD) instead of the stored cursor: a backfill.
        #[arg(long)]
        since: Option<chrono::NaiveDate>,
    },
    /// Show a connector's saved state (cursor, last day read, spend lines) and who runs it.
    State {
        id: String,
        /// Print the saved state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a connector's saved state: its next run reads from scratch.
    Reset { id: String },
}

/// Logs to standard error (secrets redacted), as `log.format` asks: text (coloured only on a
/// terminal) or one JSON object per line.
fn init_tracing(format: kpi_config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| connectors::RedactingStderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        kpi_config::LogFormat::Json => builder.json().init(),
        kpi_config::LogFormat::Text => builder.init(),
    }
}

/// The configuration file a command names, for the log format (read before anything logs; a
/// configuration that does not load logs as text, and the command then says why).
fn config_path(command: &Command) -> Option<&std::path::Path> {
    match command {
        Command::Serve { config }
        | Command::Publish { config, .. }
        | Command::Report { config, .. }
        | Command::Connectors { config, .. }
        | Command::Cluster { config, .. }
        | Command::Config { config, .. }
        | Command::Import { config, .. }
        | Command::Demo { config, .. } => config.as_deref(),
    }
}

/// The process's clock: the system clock, or the one `KPI_CLOCK` asks for (an RFC 3339
/// instant read as "now" at start, then advancing in real time), for tests and demos of
/// period ends.
fn clock_from_env() -> anyhow::Result<kpi_model::Clock> {
    let Ok(text) = std::env::var(CLOCK_ENV) else {
        return Ok(kpi_model::Clock::system());
    };
    let start = chrono::DateTime::parse_from_rfc3339(text.trim()).map_err(|_| {
        anyhow::anyhow!(
            "{CLOCK_ENV}: `{text}` is not an RFC 3339 instant such as 2026-12-31T23:59:00Z"
        )
    })?;
    let clock = kpi_model::Clock::starting_at(start.with_timezone(&chrono::Utc));
    tracing::warn!(now = %start, "{CLOCK_ENV} is set: dates are read from a shifted clock");
    Ok(clock)
}

/// The environment variable that shifts the clock.
const CLOCK_ENV: &str = "KPI_CLOCK";

fn main() -> anyhow::Result<()> {
    return_freed_memory_at_once();
    let cli = Cli::parse();
    init_tracing(
        kpi_config::Config::load(config_path(&cli.command))
            .map(|config| config.log.format)
            .unwrap_or_default(),
    );
    let clock = clock_from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => serve::run(config.as_deref(), clock).await,
            Command::Publish {
                file,
                config,
                tenant,
            } => {
                let config = kpi_config::Config::load(config.as_deref())?;
                publish::publish_file(&config, &file, &tenant, clock.now()).await
            }
            Command::Report {
                tenant,
                period,
                trend,
                retention,
                last,
                channel,
                campaign,
                url,
                config,
                json,
                csv,
            } => {
                let config = kpi_config::Config::load(config.as_deref())?;
                let url = url.unwrap_or_else(|| format!("http://{}", config.http.listen));
                let today = config.tenants().get(&tenant).today(clock.now());
                let kind = report::kind(today, period, trend, retention, last, channel, campaign)?;
                let format = match (json, csv) {
                    (true, _) => report::Format::Json,
                    (_, true) => report::Format::Csv,
                    _ => report::Format::Table,
                };
                report::print(&url, &tenant, &kind, format).await
            }
            Command::Config {
                command: ConfigCommand::Check,
                config,
            } => serve::check_config(config.as_deref(), clock),
            Command::Connectors { command, config } => {
                let config = kpi_config::Config::load(config.as_deref())?;
                match command {
                    ConnectorsCommand::List => connectors::list(&config),
                    ConnectorsCommand::Check { id } => {
                        connectors::check(&config, &id, clock).await
                    }
                    ConnectorsCommand::Run { id, since } => {
                        connectors::run(&config, &id, since, clock).await
                    }
                    ConnectorsCommand::State { id, json } => {
                        connectors::state(&config, &id, json).await
                    }
                    ConnectorsCommand::Reset { id } => connectors::reset(&config, &id).await,
                }
            }
            Command::Cluster {
                command: ClusterCommand::Migrate,
                config,
            } => {
                let config = kpi_config::Config::load(config.as_deref())?;
                cluster_migrate(&config).await
            }
            Command::Import {
                file,
                kind,
                tenant,
                config,
            } => {
                let config = kpi_config::Config::load(config.as_deref())?;
                connectors::import(&config, &file, &kind, &tenant, clock).await
            }
            Command::Demo {
                config,
                tenant,
                leads_per_day,
                years,
                out,
                seed,
            } => {
                let config = kpi_config::Config::load(config.as_deref())?;
                let events = demo::history(&tenant, seed, leads_per_day, years, clock.now());
                match out {
                    Some(path) => demo::write(&events, &path),
                    None => {
                        let summary =
                            publish::publish_events(&config, events, "demo history").await?;
                        println!(
                            "published the demo history of tenant `{tenant}`: {} events ({} already in the stream)",
                            summary.stored, summary.duplicates
                        );
                        Ok(())
                    }
                }
            }
        }
    })
}

/// `kpi cluster migrate`, with its progress on standard error.
async fn cluster_migrate(config: &kpi_config::Config) -> anyhow::Result<()> {
    let stream = &config.nats.stream;
    let partitions = config.cluster.partitions;
    let migration = kpi_ingest::migrate::migrate(config, |copied, total| {
        if total > 0 {
            eprintln!("{stream}: {copied} of {total} events copied under their partitions");
        }
    })
    .await?;
    if migration.already_partitioned {
        println!("{stream} was already partitioned into {partitions}");
    } else {
        println!("{stream} is now partitioned into {partitions}");
    }
    println!(
        "{} events stored before were copied under their tenant's partition (the originals removed){}",
        migration.copied,
        if migration.consumer_deleted {
            format!("; the single engine's consumer `{}` is deleted", config.nats.consumer)
        } else {
            String::new()
        }
    );
    if migration.left_out > 0 {
        println!(
            "{} messages on a subject without an event type (invalid, dead-lettered before) were removed, not copied",
            migration.left_out
        );
    }
    println!("next: start every engine with the same [cluster] settings, each with an empty store.path (keep the old store as a backup)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads plain integer options.
        unsafe {
            // Its documented default: the index names purge_delay in the mimalloc linked.
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 1000);
            return_freed_memory_at_once();
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 0);
        }
    }
}
