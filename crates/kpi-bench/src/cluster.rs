//! `kpi-bench --cluster`: multi-engine mode measured, for the section "Multi-engine mode" of
//! BENCHMARKS.md.
//!
//! 1. One server: the partitioned stream pre-loaded with `--events` events of 256 tenants;
//!    the bare consumer, then one engine in multi-engine mode from an empty store to ready
//!    (every partition caught up), `--runs` times; then two engines, one killed (`kill -9`):
//!    takeover of its partitions by an engine that never applied them (its store cold, the
//!    whole partitions to apply) and, after the killed engine came back, by one that had
//!    (warm).
//! 2. A 3-node cluster (R3 streams, `sync_interval: always`): `--cluster-events` events, then
//!    1, 2 and 3 engines from empty stores to ready; with 3 engines, the API answering locally
//!    and forwarding to the owner, a `kill -9` and a fourth engine joining.

use super::*;

const SECTION: &str = "## Multi-engine mode";

/// Tenants of a history of about `events`, each with a year of the demo generator (about
/// 2,050 events a year at one lead a day, the least it makes).
fn tenants_for(events: u64) -> u32 {
    (events / 2_050).clamp(4, 256) as u32
}

fn cluster_env(
    name: &str,
    partitions: u32,
    replicas: u32,
    standby: bool,
) -> Vec<(&'static str, String)> {
    vec![
        ("KPI__CLUSTER__ENABLED", "true".into()),
        ("KPI__CLUSTER__STANDBY", standby.to_string()),
        ("KPI__CLUSTER__ENGINE", name.into()),
        ("KPI__CLUSTER__PARTITIONS", partitions.to_string()),
        ("KPI__NATS__REPLICAS", replicas.to_string()),
        ("KPI__METRICS__MAX_TENANTS", "1000".into()),
    ]
}

/// An engine in multi-engine mode named `name`, its store under `dir`, with or without
/// standbys (`cluster.standby`).
fn start_member(
    args: &Args,
    nats_url: &str,
    dir: &Path,
    name: &str,
    replicas: u32,
    standby: bool,
) -> anyhow::Result<Engine> {
    Engine::start_with(
        &args.engine,
        nats_url,
        dir,
        &cluster_env(name, args.partitions, replicas, standby),
    )
}

/// Waits until `engine` follows every one of `partitions` as a standby, caught up with
/// nothing left to apply.
async fn standby_caught_up(engine: &Engine, partitions: &[u32]) {
    loop {
        let text = match reqwest::get(engine.url("/metrics")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let value = |name: &str, partition: u32| {
            text.lines().find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix('{')?;
                let (labels, value) = rest.rsplit_once("} ")?;
                labels
                    .contains(&format!("partition=\"{partition}\""))
                    .then(|| value.trim().parse::<f64>().ok())?
            })
        };
        if partitions.iter().all(|&partition| {
            value("kpi_engine_partition_standby", partition) == Some(1.0)
                && value("kpi_engine_partition_standby_lag_messages", partition) == Some(0.0)
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tenant(index: u32) -> String {
    format!("t{index:03}")
}

/// About `events` more events, all in partition `partition`: tenants other than
/// [`histories`]', of that partition only.
fn more_histories_in(
    events: u64,
    partition: u32,
    partitions: u32,
) -> impl Iterator<Item = Outgoing> {
    let tenants = tenants_for(events);
    let per_tenant = leads_per_day_for(events / u64::from(tenants) * 6);
    let names: Vec<String> = (0u32..)
        .map(|index| format!("u{index:05}"))
        .filter(|name| kpi_model::partition_of(name, partitions) == partition)
        .take(tenants as usize)
        .collect();
    names
        .into_iter()
        .enumerate()
        .flat_map(move |(index, name)| history_of_years(&name, 1000 + index as u64, per_tenant, 1))
}

/// Every tenant's demo history, one after the other, about `events` in all.
fn histories(events: u64) -> impl Iterator<Item = Outgoing> {
    let tenants = tenants_for(events);
    // `leads_per_day_for` is for six years.
    let per_tenant = leads_per_day_for(events / u64::from(tenants) * 6);
    (0..tenants)
        .flat_map(move |index| history_of_years(&tenant(index), u64::from(index), per_tenant, 1))
}

/// The event stream as multi-engine mode creates it.
async fn create_partitioned_stream(
    js: &jetstream::Context,
    partitions: u32,
    replicas: usize,
) -> anyhow::Result<()> {
    js.create_stream(jetstream::stream::Config {
        name: "KPI_EVENTS".into(),
        subjects: vec!["kpi.events.*.>".into()],
        subject_transform: Some(jetstream::stream::SubjectTransform {
            source: "kpi.events.*.>".into(),
            destination: format!(
                "{{{{partition({partitions},1)}}}}.kpi.events.{{{{wildcard(1)}}}}.>"
            ),
        }),
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Partitions `engine` owns and exports (`kpi_engine_partition_owned` at 1).
async fn owned(engine: &Engine) -> Vec<u32> {
    let Ok(response) = reqwest::get(engine.url("/metrics")).await else {
        return Vec::new();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("kpi_engine_partition_owned{")?;
            let (labels, value) = rest.rsplit_once("} ")?;
            if value.trim() != "1" {
                return None;
            }
            let partition = labels.split("partition=\"").nth(1)?.split('"').next()?;
            partition.parse().ok()
        })
        .collect()
}

/// Waits until `engines` own every partition once between them, each at least one; returns
/// how long that took.
async fn settled(engines: &[&Engine], partitions: u32) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = Vec::new();
        let mut each = true;
        for engine in engines {
            let mine = owned(engine).await;
            each &= !mine.is_empty();
            all.extend(mine);
        }
        all.sort_unstable();
        if each && all == (0..partitions).collect::<Vec<_>>() {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `engine`'s API answers, other than 503, for a tenant of each of `moved` (a
/// tenant with history where there is one); returns how long that took from `since`. A 503 means the
/// tenant's partition has no caught-up owner; the engine answers for the partitions it exports
/// and forwards the others to their owner.
async fn answering(
    engine: &Engine,
    moved: &[u32],
    tenants: u32,
    partitions: u32,
    since: Instant,
) -> Duration {
    let client = reqwest::Client::new();
    let mut waiting: Vec<String> = moved
        .iter()
        .map(|&partition| {
            (0..tenants)
                .map(tenant)
                .chain((0u32..).map(|index| format!("probe{index}")))
                .find(|name| kpi_model::partition_of(name, partitions) == partition)
                .expect("a tenant of every partition")
        })
        .collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for name in waiting {
            let answered = client
                .get(engine.url(&format!("/api/v1/kpis?tenant={name}&period=all")))
                .send()
                .await
                .is_ok_and(|response| response.status() != 503);
            if !answered {
                still.push(name);
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    since.elapsed()
}

/// `kill -9` of `killed`; returns how long until the API of the first of `survivors` answers
/// for every one of `moved` again, once their `/metrics` show every partition owned.
async fn take_over(
    killed: &mut Engine,
    survivors: &[&Engine],
    moved: &[u32],
    tenants: u32,
    partitions: u32,
) -> Duration {
    let at = killed.kill9();
    let took = answering(survivors[0], moved, tenants, partitions, at).await;
    settled(survivors, partitions).await;
    took
}

/// How long one scrape of `engine`'s `/metrics` takes, and its size in bytes.
async fn scrape(engine: &Engine) -> (Duration, usize) {
    let started = Instant::now();
    let size = match reqwest::get(engine.url("/metrics")).await {
        Ok(response) => response.bytes().await.map(|body| body.len()).unwrap_or(0),
        Err(_) => 0,
    };
    (started.elapsed(), size)
}

/// Messages stored under each partition.
async fn partition_sizes(js: &jetstream::Context, partitions: u32) -> anyhow::Result<Vec<u64>> {
    let stream = js.get_stream("KPI_EVENTS").await?;
    let mut sizes = Vec::new();
    for partition in 0..partitions {
        let mut reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{partition}.>"),
                ..Default::default()
            })
            .await?;
        sizes.push(reader.info().await?.num_pending);
    }
    Ok(sizes)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A 3-node nats-server cluster on loopback, `sync_interval: always`; its nodes stop when it
/// is dropped.
struct NatsCluster {
    _nodes: Vec<Nats>,
    url: String,
}

fn start_cluster(binary: &str, dir: &Path) -> anyhow::Result<NatsCluster> {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, route)| format!("\"nats-route://127.0.0.1:{route}\""))
        .collect();
    let mut nodes = Vec::new();
    for (index, (port, route)) in ports.iter().enumerate() {
        let store = dir.join(format!("n{index}"));
        std::fs::create_dir_all(&store)?;
        let config = dir.join(format!("n{index}.conf"));
        std::fs::write(
            &config,
            format!(
                "server_name: n{index}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\", sync_interval: always }}\ncluster {{ name: bench, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                store.display(),
                routes.join(", ")
            ),
        )?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        nodes.push(Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        });
    }
    let url = nodes
        .iter()
        .map(|node| node.url.clone())
        .collect::<Vec<_>>()
        .join(",");
    Ok(NatsCluster { _nodes: nodes, url })
}

/// Waits until JetStream answers on the cluster (a meta leader is elected).
async fn jetstream_ready(url: &str) -> anyhow::Result<jetstream::Context> {
    let started = Instant::now();
    let first = url.split(',').next().unwrap_or(url);
    let client = loop {
        match async_nats::connect(first).await {
            Ok(client) => break client,
            Err(error) if started.elapsed() > Duration::from_secs(30) => return Err(error.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let js = jetstream::new(client);
    while js.query_account().await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "JetStream not ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(js)
}

/// p50 and p99 (ms) of `/api/v1/kpis` on `engine` for `tenants`, `requests` times in turn.
async fn query_latency(engine: &Engine, tenants: &[String], requests: usize) -> (f64, f64) {
    let client = reqwest::Client::new();
    let mut times = Vec::with_capacity(requests);
    for request in 0..requests {
        let tenant = &tenants[request % tenants.len()];
        let started = Instant::now();
        let response = client
            .get(engine.url(&format!("/api/v1/kpis?tenant={tenant}&period=all")))
            .send()
            .await;
        if let Ok(response) = response {
            if response.status() == 200 && response.bytes().await.is_ok() {
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    times.sort_by(f64::total_cmp);
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

struct Ingest {
    engines: usize,
    seconds: f64,
    cpu_seconds: f64,
}

/// Two engines without standbys, one killed: the survivor takes its partitions over cold
/// (never applied them); the killed one comes back, takes its share again, and is killed
/// again: the survivor takes them over warm. Returns the partitions moved, their events, the
/// cold takeover, the warm one and the rejoin.
async fn cold_and_warm(
    args: &Args,
    url: &str,
    js: &jetstream::Context,
    work: &Path,
) -> anyhow::Result<(Vec<u32>, u64, Duration, Duration, Duration)> {
    let partitions = args.partitions;
    let sizes = partition_sizes(js, partitions).await?;
    let mut x = start_member(args, url, &work.join("x"), "x", 1, false)?;
    let y = start_member(args, url, &work.join("y"), "y", 1, false)?;
    x.wait_ready().await;
    y.wait_ready().await;
    settled(&[&x, &y], partitions).await;
    let moved = owned(&x).await;
    let tail: u64 = moved.iter().map(|&p| sizes[p as usize]).sum();
    let cold = take_over(&mut x, &[&y], &moved, tenants_for(args.events), partitions).await;
    eprintln!(
        "cold takeover of {} partitions ({tail} events): {cold:?}",
        moved.len()
    );
    let mut x = start_member(args, url, &work.join("x"), "x", 1, false)?;
    x.wait_ready().await;
    let rejoined = settled(&[&x, &y], partitions).await;
    let warm = take_over(&mut x, &[&y], &moved, tenants_for(args.events), partitions).await;
    eprintln!("warm rejoin {rejoined:?}, warm takeover {warm:?}");
    y.stop();
    Ok((moved, tail, cold, warm, rejoined))
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let partitions = args.partitions;
    let mut section = Vec::new();
    let mut line = |text: String| {
        eprintln!("{text}");
        section.push(text);
    };

    // 1. One server: partitioned ingest against the bare consumer; takeovers.
    let nats = start_nats(&args.nats_server, &work.join("nats"))?;
    let client = async_nats::connect(&nats.url).await?;
    let js = jetstream::new(client.clone());
    create_partitioned_stream(&js, partitions, 1).await?;
    eprintln!("pre-loading about {} events...", args.events);
    let (loaded, publish_rate) = publish(&js, histories(args.events)).await?;
    eprintln!("loaded {loaded} events at {publish_rate:.0}/s");
    let mut ratios = Vec::new();
    let mut rows = Vec::new();
    let runs = if args.only_takeovers { 0 } else { args.runs };
    for run in 0..runs {
        let bare = bare_consumer(&js, &format!("bare-{run}"), loaded).await?;
        let name = format!("single-{run}");
        let engine = start_member(args, &nats.url, &work.join(&name), &name, 1, true)?;
        let seconds = engine.wait_ready().await.as_secs_f64();
        let rate = loaded as f64 / seconds;
        let cpu = engine.cpu_seconds();
        engine.stop();
        eprintln!("run {run}: bare {bare:.0}/s, one partitioned engine {rate:.0}/s");
        ratios.push(rate / bare);
        rows.push((bare, rate, cpu));
    }
    let ratio = if ratios.is_empty() {
        0.0
    } else {
        median(&mut ratios.clone())
    };

    let (moved, tail, cold, warm, rejoined) = if args.only_takeovers {
        (
            Vec::new(),
            0,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
        )
    } else {
        cold_and_warm(args, &nats.url, &js, &work).await?
    };

    // With standbys: two engines on the stores above, another `--events` published while
    // they run, all in one of the partitions of the engine to be killed (a tail of that size
    // in one partition); once the survivor-to-be follows the other's partitions with nothing
    // left to apply, the other is killed. Then, `--takeovers` times in all, the killed engine
    // comes back, takes its share again, and is killed once the survivor follows it again.
    let mut x = start_member(args, &nats.url, &work.join("x"), "x", 1, true)?;
    let y = start_member(args, &nats.url, &work.join("y"), "y", 1, true)?;
    x.wait_ready().await;
    y.wait_ready().await;
    settled(&[&x, &y], partitions).await;
    let followed = owned(&x).await;
    let hot = *followed
        .first()
        .ok_or_else(|| anyhow::anyhow!("x owns no partition"))?;
    let before = partition_sizes(&js, partitions).await?[hot as usize];
    publish(&js, more_histories_in(args.events, hot, partitions)).await?;
    settled(&[&x, &y], partitions).await;
    anyhow::ensure!(
        owned(&x).await.contains(&hot),
        "partition {hot} moved while both ran"
    );
    let sizes = partition_sizes(&js, partitions).await?;
    let loaded_tail = sizes[hot as usize] - before;
    let mut standbys = Vec::new();
    for run in 0..args.takeovers.max(1) {
        if run > 0 {
            x = start_member(args, &nats.url, &work.join("x"), "x", 1, true)?;
            x.wait_ready().await;
            settled(&[&x, &y], partitions).await;
        }
        let followed = owned(&x).await;
        standby_caught_up(&y, &followed).await;
        let followed_tail: u64 = followed.iter().map(|&p| sizes[p as usize]).sum();
        let took = take_over(
            &mut x,
            &[&y],
            &followed,
            tenants_for(args.events),
            partitions,
        )
        .await;
        eprintln!(
            "standby takeover {} of {} partitions ({followed_tail} events{}): {took:?}",
            run + 1,
            followed.len(),
            if followed.contains(&hot) {
                format!(", {loaded_tail} published live to partition {hot}")
            } else {
                String::new()
            }
        );
        standbys.push((followed.len(), followed_tail, followed.contains(&hot), took));
    }
    let (scrape_time, scrape_size) = scrape(&y).await;
    eprintln!("a scrape of the survivor's /metrics: {scrape_size} bytes in {scrape_time:?}");
    y.stop();
    drop(x);
    if args.only_takeovers {
        return Ok(());
    }
    drop(client);
    drop(nats);

    // 2. A 3-node cluster.
    let cluster = start_cluster(&args.nats_server, &work.join("cluster"))?;
    let js = jetstream_ready(&cluster.url).await?;
    create_partitioned_stream(&js, partitions, 3).await?;
    eprintln!(
        "pre-loading about {} events on the 3-node cluster...",
        args.cluster_events
    );
    let (cluster_loaded, cluster_publish_rate) =
        publish(&js, histories(args.cluster_events)).await?;
    eprintln!("loaded {cluster_loaded} events at {cluster_publish_rate:.0}/s");
    let mut ingests = Vec::new();
    let mut three = Vec::new();
    for count in 1..=3usize {
        let engines: Vec<Engine> = (0..count)
            .map(|index| {
                let name = format!("c{count}-{index}");
                start_member(args, &cluster.url, &work.join(&name), &name, 3, true)
            })
            .collect::<anyhow::Result<_>>()?;
        let started = Instant::now();
        for engine in &engines {
            engine.wait_ready().await;
        }
        settled(&engines.iter().collect::<Vec<_>>(), partitions).await;
        // Ready again once the partitions moved between them: every engine caught up.
        for engine in &engines {
            engine.wait_ready().await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu_seconds = engines.iter().map(Engine::cpu_seconds).sum();
        eprintln!(
            "{count} engine(s): {:.0} events/s",
            cluster_loaded as f64 / seconds
        );
        ingests.push(Ingest {
            engines: count,
            seconds,
            cpu_seconds,
        });
        if count == 3 {
            three = engines;
        } else {
            for engine in engines {
                engine.stop();
            }
        }
    }

    // Queries on the first engine: tenants it owns, and tenants it forwards.
    let mine = owned(&three[0]).await;
    let (local, remote): (Vec<String>, Vec<String>) = (0..tenants_for(args.cluster_events))
        .map(tenant)
        .partition(|name| mine.contains(&kpi_model::partition_of(name, partitions)));
    let (local_p50, local_p99) = query_latency(&three[0], &local, 2000).await;
    let (remote_p50, remote_p99) = query_latency(&three[0], &remote, 2000).await;
    eprintln!("local p99 {local_p99:.2} ms, forwarded p99 {remote_p99:.2} ms");

    let mut killed = three.pop().expect("three engines");
    let cluster_moved = owned(&killed).await;
    let cluster_takeover = take_over(
        &mut killed,
        &three.iter().collect::<Vec<_>>(),
        &cluster_moved,
        tenants_for(args.cluster_events),
        partitions,
    )
    .await;
    let cluster_moved = cluster_moved.len();
    let joining = start_member(args, &cluster.url, &work.join("c4"), "c4", 3, true)?;
    let joined = Instant::now();
    joining.wait_ready().await;
    three.push(joining);
    settled(&three.iter().collect::<Vec<_>>(), partitions).await;
    let cluster_rebalance = joined.elapsed();
    for engine in three {
        engine.stop();
    }
    let nats_version = command_output(&args.nats_server, &["--version"]);
    drop(cluster);

    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
    line(SECTION.into());
    line(String::new());
    line(format!(
        "Produced by `scripts/bench-cluster.sh` (`kpi-bench --cluster --events {} --cluster-events {} --partitions {partitions} --runs {}`) on {}, commit `{commit}`. Machine: {}; {nats_version}; engine release build, default settings (`cluster.lease_ms` 5000); a year of the demo generator's history for each of {} and {} tenants.",
        args.events,
        args.cluster_events,
        args.runs,
        chrono::Utc::now().format("%Y-%m-%d"),
        machine(),
        tenants_for(args.events),
        tenants_for(args.cluster_events)
    ));
    line(String::new());
    line(format!("### One engine in multi-engine mode against the bare consumer (one server, {loaded} events, {partitions} partitions)"));
    line(String::new());
    line("| run | bare consumer, events/s | one partitioned engine, empty store to every partition caught up, events/s | vs bare | engine CPU per event |".into());
    line("|---|---:|---:|---:|---:|".into());
    for (run, (bare, rate, cpu)) in rows.iter().enumerate() {
        line(format!(
            "| {} | {bare:.0} | {rate:.0} | {:.2} | {:.1} µs |",
            run + 1,
            rate / bare,
            cpu / loaded as f64 * 1e6
        ));
    }
    line(String::new());
    line(format!("Median ratio: **{ratio:.2}** of the bare consumer (one engine in single mode: 0.25 on 2026-12-01, 0.20 in the run above)."));
    line(String::new());
    line("### Takeover after `kill -9` (one server, two engines)".into());
    line(String::new());
    line(
        "| case | partitions moved | events to apply | until the API answers for every partition moved |"
            .into(),
    );
    line("|---|---:|---:|---:|".into());
    line(format!("| cold: the survivor never applied them (its store has none of them) | {} | {tail} | {:.1} s |", moved.len(), cold.as_secs_f64()));
    line(format!("| warm: the survivor applied them before (it had taken them over once) | {} | 0 | {:.1} s |", moved.len(), warm.as_secs_f64()));
    line(format!(
        "| the killed engine back, taking its share again (its store warm) | {} | 0 | {:.1} s |",
        moved.len(),
        rejoined.as_secs_f64()
    ));
    for (run, (count, tail, with_hot, took)) in standbys.iter().enumerate() {
        let live = if *with_hot {
            format!("; {loaded_tail} more events published to one of them (partition {hot}) while both ran")
        } else {
            String::new()
        };
        line(format!("| standby (`cluster.standby`, the default), kill {} of {}: the survivor followed them{live} | {count} | {tail} in the partitions, 0 left | {:.1} s |", run + 1, standbys.len(), took.as_secs_f64()));
    }
    line(String::new());
    let mut standby_seconds: Vec<f64> = standbys
        .iter()
        .map(|(_, _, _, took)| took.as_secs_f64())
        .collect();
    let standby = median(&mut standby_seconds);
    let longest = standby_seconds.last().copied().unwrap_or_default();
    line(format!(
        "Standby takeovers, over {} kills: median **{standby:.1} s**, longest **{longest:.1} s**.",
        standbys.len()
    ));
    line(String::new());
    line(format!("Each takeover runs from the `kill -9` until the survivor's `/api/v1/kpis` answers (not 503) for a tenant of every partition moved; its `/metrics` then shows every partition owned. Reading that from `/metrics` instead adds a scrape: the survivor's, with every tenant exported (`metrics.max_tenants` 1000 here), is {:.0} MB and takes {:.1} s on this machine.", scrape_size as f64 / 1e6, scrape_time.as_secs_f64()));
    line(String::new());
    line(format!("### 3-node cluster (R3, `sync_interval: always`, {cluster_loaded} events published at {cluster_publish_rate:.0}/s)"));
    line(String::new());
    line("| engines | empty stores to every partition caught up | events/s | CPU of the engines per event |".into());
    line("|---:|---:|---:|---:|".into());
    for ingest in &ingests {
        line(format!(
            "| {} | {:.1} s | {:.0} | {:.1} µs |",
            ingest.engines,
            ingest.seconds,
            cluster_loaded as f64 / ingest.seconds,
            ingest.cpu_seconds / cluster_loaded as f64 * 1e6
        ));
    }
    line(String::new());
    line(format!("With three engines: `kill -9` of one ({cluster_moved} partitions, followed by standbys) until the API answers for every one of them again: **{:.1} s**; a fourth engine joining, from its start to the partitions shared by three again: **{:.1} s**.", cluster_takeover.as_secs_f64(), cluster_rebalance.as_secs_f64()));
    line(String::new());
    line("| `/api/v1/kpis?period=all` on one engine | p50 | p99 |".into());
    line("|---|---:|---:|".into());
    line(format!("| tenant of a partition it owns (answered locally) | {local_p50:.2} ms | {local_p99:.2} ms |"));
    line(format!("| tenant of another engine's partition (forwarded over NATS request/reply) | {remote_p50:.2} ms | {remote_p99:.2} ms |"));
    line(String::new());
    let catch_up = (cold - warm).as_secs_f64().max(0.001);
    let rate = tail as f64 / catch_up;
    let per_core = 1e6 / (ingests[0].cpu_seconds / cluster_loaded as f64 * 1e6);
    line(format!("Reading these figures: a takeover is the lease running out on the server (`lease_ms`, 5 s by default, from the killed engine's last renewal, up to a fifth of a lease before the kill) and the next round of the survivors (a twentieth of a lease once they see the killed engine's heartbeat silent), a quarter of a lease of grace, then the catch-up. The warm takeover is that fixed part ({:.1} s here); the cold one adds applying {tail} events at about {rate:.0} events/s while reading the whole stream once. A partition with a 1M-event tail that the new owner never applied would take about {:.0} s without a standby; with one (the default) the tail is already applied and the takeover is the fixed part, whatever the tail (a median of {:.1} s here), for applying every event twice over the engines. The cold and warm rows run with `cluster.standby = false`; the 3-node rows above with standbys, so with two or three engines each event is applied twice (by its owner and by its standby, which starts once the engine has caught up on what it owns: the rows measure the owners catching up, and the CPU of the engines per event grows with the standbys' share of that time). On one 2-core machine, engines added share the same two cores with three NATS servers, so throughput cannot grow with engines here; an engine uses {:.1} µs of CPU per event applied (one engine, 3-node cluster), about {per_core:.0} events/s per core, so engines on separate hosts add about that each, up to what the NATS cluster delivers (it stored R3 writes with `sync_interval: always` at {cluster_publish_rate:.0} events/s here).", warm.as_secs_f64(), warm.as_secs_f64() + 1_000_000.0 / rate, standby, ingests[0].cpu_seconds / cluster_loaded as f64 * 1e6));
    line(String::new());
    let text = section.join("\n") + "\n";
    match &args.out {
        Some(path) => {
            let existing = std::fs::read_to_string(path).unwrap_or_default();
            std::fs::write(path, splice(&existing, &text))?;
            eprintln!("wrote the section to {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// `document` with its section [`SECTION`] (to the next `## ` heading) replaced by `section`,
/// or `section` appended.
fn splice(document: &str, section: &str) -> String {
    let Some(start) = document.find(&format!("{SECTION}\n")) else {
        return format!("{}\n{section}", document.trim_end());
    };
    let rest = &document[start + SECTION.len()..];
    let end = rest
        .find("\n## ")
        .map(|offset| start + SECTION.len() + offset + 1)
        .unwrap_or(document.len());
    format!("{}{section}{}", &document[..start], &document[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_replaces_its_old_self_or_is_appended() {
        let section = format!("{SECTION}\n\nnew\n");
        assert_eq!(
            splice("# B\n\n## A\n\na\n", &section),
            format!("# B\n\n## A\n\na\n{section}")
        );
        assert_eq!(
            splice(&format!("# B\n\n{SECTION}\n\nold\n\n## Z\n\nz\n"), &section),
            format!("# B\n\n{section}## Z\n\nz\n")
        );
        assert_eq!(
            splice(&format!("# B\n\n{SECTION}\n\nold\n"), &section),
            format!("# B\n\n{section}")
        );
    }
}
