//! `kpi-bench`: measures the engine against a real `nats-server`, and writes the results as
//! Markdown (`scripts/bench.sh` puts them in BENCHMARKS.md).
//!
//! 1. Pre-loads `KPI_EVENTS` with a realistic mixed history (the demo generator, one tenant).
//! 2. Ingest rate: a bare async-nats pull consumer that only acknowledges (AckPolicy::All,
//!    batches of 1,000), then the real `kpi serve` from an empty store, then the bare consumer
//!    again, all on the same stream in the same run, so the ratio holds on a noisy machine.
//! 3. `/api/v1/kpis` answer time for a month, with the first history and after growing it to
//!    the larger size; the start-up rebuild time at that size.
//! 4. Event-to-gauge latency at a steady rate: probe events published while a background load
//!    runs, each timed until the API shows it.
//! 5. Peak RSS of the engine (VmHWM).
//! 6. History answers: 36-month series, the 6-year retention series and the page at `/`, at
//!    both history sizes.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use clap::Parser;
use futures_util::StreamExt;
use kpi::publish::Outgoing;

mod cluster;

#[derive(Parser)]
struct Args {
    /// Events in the first history.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events of history for the second API measurement (0 skips it).
    #[arg(long, default_value_t = 10_000_000)]
    large_events: u64,
    /// The engine binary (release build).
    #[arg(long, default_value = "target/release/kpi")]
    engine: PathBuf,
    /// nats-server binary.
    #[arg(long, default_value = "nats-server")]
    nats_server: String,
    /// Events per second of the background load during the latency measurement.
    #[arg(long, default_value_t = 1000)]
    steady_rate: u64,
    /// Seconds of the latency measurement.
    #[arg(long, default_value_t = 30)]
    steady_seconds: u64,
    /// Where to write the Markdown report (stdout when absent).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Working directory (stream and store); a temporary one when absent.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Multi-engine mode instead (`scripts/bench-cluster.sh`): partitioned ingest against the
    /// bare consumer (`--events`, `--runs` times), then 1 to 3 engines on a 3-node cluster
    /// (`--cluster-events`), takeover, rebalance and forwarded queries; `--out` is the
    /// BENCHMARKS.md whose section "Multi-engine mode" it replaces. `--nats-server` must be
    /// 2.11 or later.
    #[arg(long)]
    cluster: bool,
    /// Events pre-loaded in the 3-node cluster (R3, fsync on every write).
    #[arg(long, default_value_t = 200_000)]
    cluster_events: u64,
    /// Partitions in multi-engine mode.
    #[arg(long, default_value_t = 64)]
    partitions: u32,
    /// Runs of the partitioned ingest measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// `kill -9`s of an engine whose partitions a standby follows (the median and the
    /// longest are reported).
    #[arg(long, default_value_t = 5)]
    takeovers: usize,
    /// Multi-engine mode: only the standby takeovers (`--takeovers` of them), printed and not
    /// written; to look into a takeover with the engines' logs under `--work-dir`.
    #[arg(long)]
    only_takeovers: bool,
}

struct Nats {
    child: Child,
    url: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_nats(binary: &str, dir: &Path) -> anyhow::Result<Nats> {
    let port = free_port();
    let child = Command::new(binary)
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--store_dir",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {binary}"))?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Nats {
        child,
        url: format!("nats://127.0.0.1:{port}"),
    })
}

struct Engine {
    child: Child,
    port: u16,
}

impl Engine {
    fn start(binary: &Path, nats_url: &str, dir: &Path) -> anyhow::Result<Engine> {
        Self::start_with(binary, nats_url, dir, &[])
    }

    /// As [`Engine::start`], with more `KPI__*` settings.
    fn start_with(
        binary: &Path,
        nats_url: &str,
        dir: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Engine> {
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let child = Command::new(binary)
            .args(["serve"])
            .envs(env.iter().map(|(key, value)| (key, value)))
            .env("KPI__NATS__URL", nats_url)
            .env("KPI__STORE__PATH", dir.join("store"))
            .env("KPI__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "RUST_LOG",
                std::env::var("KPI_BENCH_ENGINE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("engine.log"))?)
            .spawn()
            .context("starting the engine")?;
        Ok(Engine { child, port })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    async fn wait_ready(&self) -> Duration {
        let started = Instant::now();
        loop {
            if let Ok(response) = reqwest::get(self.url("/readyz")).await {
                if response.status() == 200 {
                    return started.elapsed();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// CPU time (user + system) the engine used so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which ends with ')'): utime and stime are 12 and 13.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        match (ticks(11), ticks(12)) {
            (Some(user), Some(system)) => (user + system) / 100.0,
            _ => f64::NAN,
        }
    }

    /// Peak resident memory (VmHWM) in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// SIGKILL; returns when it was sent (also written to stderr, to read the engines' logs
    /// against).
    fn kill9(&mut self) -> Instant {
        eprintln!(
            "kill -9 of engine pid {} at {}",
            self.child.id(),
            chrono::Utc::now().format("%H:%M:%S%.3fZ")
        );
        let sent = Instant::now();
        let _ = self.child.kill();
        let _ = self.child.wait();
        sent
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Publishes through the engine's own publisher; returns the count and events/s.
async fn publish(
    js: &jetstream::Context,
    events: impl Iterator<Item = Outgoing>,
) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let mut count = 0u64;
    kpi::publish::publish_all(js, events, |_| count += 1)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok((count, count as f64 / started.elapsed().as_secs_f64()))
}

/// The history, generated on a thread and streamed through a channel.
fn history(tenant: &str, seed: u64, leads_per_day: u32) -> std::sync::mpsc::IntoIter<Outgoing> {
    history_of_years(tenant, seed, leads_per_day, 6)
}

/// As [`history`], over `years` years before the current month.
fn history_of_years(
    tenant: &str,
    seed: u64,
    leads_per_day: u32,
    years: u32,
) -> std::sync::mpsc::IntoIter<Outgoing> {
    let (sender, receiver) = std::sync::mpsc::sync_channel(100_000);
    let tenant = tenant.to_string();
    std::thread::spawn(move || {
        kpi::demo::stream_history(
            &tenant,
            seed,
            leads_per_day,
            years,
            chrono::Utc::now(),
            &mut |event| {
                let _ = sender.send(event);
            },
        );
    });
    receiver.into_iter()
}

/// Leads per day that make about `events` events over the demo's six years.
fn leads_per_day_for(events: u64) -> u32 {
    // measured on the generator over six years and a month: 829,844 events for 236 leads a
    // day (today; fewer in the early years); daily spend lines weigh less at that scale
    ((events as f64 / 3516.0).round() as u32).max(1)
}

/// Consumes everything with a bare pull consumer that only acknowledges; returns msg/s.
async fn bare_consumer(js: &jetstream::Context, name: &str, expected: u64) -> anyhow::Result<f64> {
    let stream = js.get_stream("KPI_EVENTS").await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_string()),
            ack_policy: consumer::AckPolicy::All,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await?;
    let started = Instant::now();
    let mut seen = 0u64;
    while seen < expected {
        let message = messages.next().await.context("stream ended")??;
        seen += 1;
        if seen.is_multiple_of(1000) || seen == expected {
            message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let rate = seen as f64 / started.elapsed().as_secs_f64();
    stream.delete_consumer(name).await?;
    Ok(rate)
}

/// Waits until the engine's consumer has nothing pending nor unacknowledged.
async fn wait_drained(js: &jetstream::Context) -> anyhow::Result<()> {
    let stream = js.get_stream("KPI_EVENTS").await?;
    loop {
        if let Ok(info) = stream.consumer_info("kpi-engine").await {
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Times `count` answers of `/api/v1/kpis` for the current month; (p50, p99, max) in ms.
async fn api_latency(
    engine: &Engine,
    tenant: &str,
    count: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let url = engine.url(&format!("/api/v1/kpis?tenant={tenant}&period={month}"));
    time_requests(&reqwest::Client::new(), &url, count).await
}

/// Times `count` sequential GETs of `url`, each answer read whole; (p50, p99, max) in ms.
async fn time_requests(
    client: &reqwest::Client,
    url: &str,
    count: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let response = client.get(url).send().await?;
        anyhow::ensure!(
            response.status() == 200,
            "{url} answered {}",
            response.status()
        );
        let _ = response.bytes().await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok((
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        *times.last().unwrap_or(&f64::NAN),
    ))
}

/// Times `count` answers of each history question (36 months of the total and of a channel,
/// 6 years of retention, the page at `/`); (name, p50, p99, max) in ms.
async fn history_latency(
    engine: &Engine,
    tenant: &str,
    count: usize,
) -> anyhow::Result<Vec<(&'static str, f64, f64, f64)>> {
    use chrono::Datelike;
    let client = reqwest::Client::new();
    let today = chrono::Utc::now().date_naive();
    let to = today.format("%Y-%m").to_string();
    let back = today
        .checked_sub_months(chrono::Months::new(35))
        .unwrap_or(today)
        .format("%Y-%m")
        .to_string();
    let year = today.year();
    let questions = [
        ("`/api/v1/kpis/series`, 36 months, total", format!("/api/v1/kpis/series?tenant={tenant}&granularity=month&from={back}&to={to}")),
        ("`/api/v1/kpis/series`, 36 months, one channel", format!("/api/v1/kpis/series?tenant={tenant}&granularity=month&from={back}&to={to}&channel=paid_search")),
        ("`/api/v1/retention/series`, 6 years", format!("/api/v1/retention/series?tenant={tenant}&from={}&to={year}", year - 5)),
        ("the page at `/` (whole HTML, 4 charts of 24 months)", format!("/?tenant={tenant}")),
    ];
    let mut results = Vec::new();
    for (name, path) in questions {
        let (p50, p99, max) = time_requests(&client, &engine.url(&path), count).await?;
        results.push((name, p50, p99, max));
    }
    Ok(results)
}

/// A metric's value from /metrics (the first sample whose line starts with `series`).
async fn metric(engine: &Engine, series: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(engine.url("/metrics")).await?.text().await?;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .with_context(|| format!("{series} not on /metrics"))
}

/// Sums of the engine's stage histograms (seconds) from /metrics.
async fn stage_seconds(engine: &Engine) -> anyhow::Result<Vec<(String, f64)>> {
    let text = reqwest::get(engine.url("/metrics")).await?.text().await?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("kpi_engine_batch_stage_seconds_sum{stage=\"")?;
            let (stage, value) = rest.split_once("\"} ")?;
            Some((stage.to_string(), value.parse().ok()?))
        })
        .collect())
}

fn probe_event(n: u64) -> Outgoing {
    let data = kpi_model::EventData::LeadCreated {
        lead_id: format!("P{n}"),
        channel: Some("probe".into()),
        campaign: None,
        qualified: None,
        customer_id: None,
    };
    let event = kpi_model::Event::new(
        "latency",
        &format!("probe-{n}"),
        "bench",
        chrono::Utc::now(),
        data,
    )
    .expect("now is a representable time");
    Outgoing::from_event(&event)
}

async fn leads_of(client: &reqwest::Client, engine: &Engine) -> i64 {
    match client
        .get(engine.url("/api/v1/kpis?tenant=latency&period=all"))
        .send()
        .await
    {
        Ok(response) => response
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["total"]["leads"].as_i64())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Publishes background load at `rate`/s and one probe every 100 ms; each probe is timed from
/// its publish to the API showing it. (p50, p99, max) in ms.
async fn steady_latency(
    js: &jetstream::Context,
    engine: &Engine,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(f64, f64, f64, usize)> {
    let background = {
        let js = js.clone();
        tokio::spawn(async move {
            let mut events = history("steady", 99, leads_per_day_for(rate * seconds * 2));
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let per_tick = (rate / 100).max(1);
            let deadline = Instant::now() + Duration::from_secs(seconds);
            while Instant::now() < deadline {
                tick.tick().await;
                for _ in 0..per_tick {
                    if let Some(event) = events.next() {
                        let mut headers = async_nats::HeaderMap::new();
                        if let Some(id) = &event.id {
                            headers.insert("Nats-Msg-Id", id.as_str());
                        }
                        let _ = js
                            .publish_with_headers(event.subject, headers, event.payload)
                            .await;
                    }
                }
            }
        })
    };
    let client = reqwest::Client::new();
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0;
    let baseline = leads_of(&client, engine).await;
    while Instant::now() < deadline {
        n += 1;
        let started = Instant::now();
        js.publish_with_headers(
            "kpi.events.latency.lead.created",
            async_nats::HeaderMap::new(),
            probe_event(n).payload,
        )
        .await?
        .await?;
        while leads_of(&client, engine).await < baseline + n as i64 {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    background.await?;
    latencies.sort_by(f64::total_cmp);
    Ok((
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap_or(&f64::NAN),
        latencies.len(),
    ))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {memory} memory")
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.cluster {
        return cluster::run(&args).await;
    }
    let temp = tempfile::tempdir()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let mut report = String::new();
    let mut line = |text: String| {
        eprintln!("{text}");
        report.push_str(&text);
        report.push('\n');
    };

    let nats = start_nats(&args.nats_server, &work.join("nats"))?;
    let client = async_nats::connect(&nats.url).await?;
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(jetstream::stream::Config {
        name: "KPI_EVENTS".into(),
        subjects: vec!["kpi.events.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;

    eprintln!("pre-loading about {} events...", args.events);
    let (loaded, publish_rate) =
        publish(&js, history("bench", 1, leads_per_day_for(args.events))).await?;
    eprintln!("loaded {loaded} events at {publish_rate:.0}/s");

    let bare_before = bare_consumer(&js, "bare-before", loaded).await?;
    eprintln!("bare consumer: {bare_before:.0} msg/s");
    let engine_dir = work.join("engine");
    std::fs::create_dir_all(&engine_dir)?;
    let started = Instant::now();
    let engine = Engine::start(&args.engine, &nats.url, &engine_dir)?;
    engine.wait_ready().await;
    wait_drained(&js).await?;
    let engine_seconds = started.elapsed().as_secs_f64();
    let engine_rate = loaded as f64 / engine_seconds;
    let engine_cpu = engine.cpu_seconds();
    eprintln!("engine: {engine_rate:.0} events/s, {engine_cpu:.1} s of CPU");
    let stages = stage_seconds(&engine).await?;
    let records_written = metric(&engine, "kpi_engine_checkpoint_records_sum").await?;
    let bare_after = bare_consumer(&js, "bare-after", loaded).await?;
    eprintln!("bare consumer again: {bare_after:.0} msg/s");
    let bare = (bare_before + bare_after) / 2.0;
    let (api_p50, api_p99, api_max) = api_latency(&engine, "bench", 2000).await?;
    let history_small = history_latency(&engine, "bench", 1000).await?;
    let rss_after_ingest = engine.peak_rss_mib();

    let (steady_p50, steady_p99, steady_max, probes) =
        steady_latency(&js, &engine, args.steady_rate, args.steady_seconds).await?;
    let rss_after_steady = engine.peak_rss_mib();

    let mut large = None;
    let mut history_large = None;
    if args.large_events > loaded {
        let extra = args.large_events - loaded;
        eprintln!("growing the history by {extra} events...");
        let (added, _) = publish(
            &js,
            history("bench", 2, leads_per_day_for(extra)).map(|mut event| {
                // a second pass over the same six years, with its own ids
                event.id = event.id.map(|id| format!("x{id}"));
                let text = String::from_utf8_lossy(&event.payload)
                    .replacen("\"id\":\"demo-", "\"id\":\"xdemo-", 1)
                    .replace("\"lead_id\":\"L", "\"lead_id\":\"XL")
                    .replace("\"deal_id\":\"D", "\"deal_id\":\"XD")
                    .replace("\"customer_id\":\"C", "\"customer_id\":\"XC");
                event.payload = text.into();
                event
            }),
        )
        .await?;
        let grown_started = Instant::now();
        wait_drained(&js).await?;
        let grown_rate = added as f64 / grown_started.elapsed().as_secs_f64();
        let (p50, p99, max) = api_latency(&engine, "bench", 2000).await?;
        history_large = Some(history_latency(&engine, "bench", 1000).await?);
        let rss_grown = engine.peak_rss_mib();
        engine.stop();
        let restarted = Engine::start(&args.engine, &nats.url, &engine_dir)?;
        let rebuild = restarted.wait_ready().await;
        let (p50_restarted, _, _) = api_latency(&restarted, "bench", 500).await?;
        let rss_restarted = restarted.peak_rss_mib();
        let store_bytes = dir_size(&engine_dir.join("store"));
        large = Some((
            loaded + added,
            grown_rate,
            p50,
            p99,
            max,
            rss_grown,
            rebuild,
            p50_restarted,
            rss_restarted,
            store_bytes,
        ));
        restarted.stop();
    } else {
        engine.stop();
    }

    let nats_version = command_output(&args.nats_server, &["--version"]);
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
    line("# Benchmarks".into());
    line(String::new());
    line(format!("Produced by `scripts/bench.sh` (`kpi-bench --events {} --large-events {}`) on {}, commit `{commit}`.", args.events, args.large_events, chrono::Utc::now().format("%Y-%m-%d")));
    line(format!("Machine: {}; {nats_version}; engine release build, default configuration (batches of 1,000, checkpoints of 20,000 events, sled cache 16 MB).", machine()));
    line(String::new());
    line("## Ingest: JetStream to acknowledged, durable aggregates".into());
    line(String::new());
    line(format!("`KPI_EVENTS` pre-loaded with {loaded} mixed events of one tenant (the demo generator: leads, qualifications, stages, deals won and lost, daily spend with restatements), published at {publish_rate:.0} events/s."));
    line(String::new());
    line("| consumer | events/s | vs bare |".into());
    line("|---|---:|---:|".into());
    line(format!("| bare async-nats pull consumer, AckPolicy::All, ack every 1,000 (before the engine) | {bare_before:.0} | |"));
    line(format!(
        "| bare consumer again (after the engine) | {bare_after:.0} | |"
    ));
    line(format!("| **kpi engine**, empty store to drained (start-up included) | **{engine_rate:.0}** | **{:.2}** |", engine_rate / bare));
    line(String::new());
    line(format!("The engine used {engine_cpu:.1} s of CPU for it ({:.1} µs per event; the machine has 2 cores, shared with nats-server) and wrote {records_written:.0} records to sled at its checkpoints ({:.2} per event).", engine_cpu / loaded as f64 * 1e6, records_written / loaded as f64));
    line(String::new());
    line(format!("Where the engine's time goes over those {engine_seconds:.1} s (sums of `kpi_engine_batch_stage_seconds`):"));
    line(String::new());
    line("| stage | seconds | share |".into());
    line("|---|---:|---:|".into());
    for (stage, seconds) in &stages {
        line(format!(
            "| {stage} | {seconds:.2} | {:.0} % |",
            seconds / engine_seconds * 100.0
        ));
    }
    line(format!(
        "| other (scheduling, metrics) | {:.2} | {:.0} % |",
        engine_seconds - stages.iter().map(|s| s.1).sum::<f64>(),
        (engine_seconds - stages.iter().map(|s| s.1).sum::<f64>()) / engine_seconds * 100.0
    ));
    line(String::new());
    line("## `/api/v1/kpis` for the current month".into());
    line(String::new());
    line("| history | p50 | p99 | max |".into());
    line("|---|---:|---:|---:|".into());
    line(format!(
        "| {loaded} events | {api_p50:.2} ms | {api_p99:.2} ms | {api_max:.2} ms |"
    ));
    if let Some((total, _, p50, p99, max, ..)) = &large {
        line(format!(
            "| {total} events | {p50:.2} ms | {p99:.2} ms | {max:.2} ms |"
        ));
    }
    line(String::new());
    line("Sequential requests over loopback with reqwest, 2,000 each; the time includes HTTP and JSON.".into());
    line(String::new());
    line("## History: series, retention and the page".into());
    line(String::new());
    line("| question | history | p50 | p99 | max |".into());
    line("|---|---|---:|---:|---:|".into());
    for (size, results) in [
        (loaded, Some(&history_small)),
        (
            large.as_ref().map(|l| l.0).unwrap_or(0),
            history_large.as_ref(),
        ),
    ] {
        for (name, p50, p99, max) in results.into_iter().flatten() {
            line(format!(
                "| {name} | {size} events | {p50:.2} ms | {p99:.2} ms | {max:.2} ms |"
            ));
        }
    }
    line(String::new());
    line("Sequential requests over loopback with reqwest, 1,000 each, the whole answer read. Each period of a series is one lookup in the in-memory aggregates, so the time does not grow with the history; the page is rendered on the server (HTML and SVG, no further request), so its first load in a browser is this time plus rendering.".into());
    line(String::new());
    line(format!(
        "## Event-to-gauge latency at {} events/s",
        args.steady_rate
    ));
    line(String::new());
    line(format!("{probes} probe events, one every 100 ms for {} s, each timed from `publish` to the API showing it (the API and /metrics read the same in-memory aggregates), under a background load of {} events/s: p50 **{steady_p50:.1} ms**, p99 **{steady_p99:.1} ms**, max {steady_max:.1} ms.", args.steady_seconds, args.steady_rate));
    line(String::new());
    line("## Memory and start-up".into());
    line(String::new());
    line(format!("- Peak RSS (VmHWM) after ingesting {loaded} events: **{rss_after_ingest:.0} MiB**; after the steady-rate run: {rss_after_steady:.0} MiB."));
    if let Some((
        total,
        grown_rate,
        _,
        _,
        _,
        rss_grown,
        rebuild,
        p50_restarted,
        rss_restarted,
        store_bytes,
    )) = &large
    {
        line(format!("- Growing the history to {total} events: ingest at {grown_rate:.0} events/s; peak RSS **{rss_grown:.0} MiB**."));
        line(format!("- Restart with {total} events of history: ready (aggregates rebuilt from the records) in **{:.1} s**, peak RSS {rss_restarted:.0} MiB; API p50 afterwards {p50_restarted:.2} ms.", rebuild.as_secs_f64()));
        line(format!(
            "- sled store on disk: {:.0} MiB.",
            *store_bytes as f64 / 1048576.0
        ));
    }
    match &args.out {
        Some(path) => std::fs::write(path, report)?,
        None => println!("{report}"),
    }
    Ok(())
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| match entry.metadata() {
                    Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
                    Ok(meta) => meta.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
