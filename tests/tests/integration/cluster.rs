//! Several engines on a three-node NATS cluster (SPEC section 5): partitions owned by one
//! engine at a time, handed over on `kill -9`, on an engine joining or leaving and on the loss
//! of the stream leader's node, with every tenant's figures exact at the end and every engine
//! answering for every tenant.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kpi_tests::{
    cluster_nats_server_binary, debian_nats_server_binary, drained, event, kpi_command,
    metric_series, metric_value, nats_server_version, publish, Engine, NatsCluster, NatsServer,
};
use serde_json::{json, Value};

const PARTITIONS: u32 = 16;
const TENANTS: usize = 1000;

fn cluster_config(name: &str) -> String {
    cluster_config_with(name, PARTITIONS, 2000)
}

fn cluster_config_with(name: &str, partitions: u32, lease_ms: u64) -> String {
    format!(
        "[cluster]\nenabled = true\nengine = \"{name}\"\npartitions = {partitions}\nlease_ms = {lease_ms}\n[metrics]\nmax_tenants = 2000\n"
    )
}

fn start_engine(nats: &NatsCluster, name: &str) -> Engine {
    Engine::start_with_env(
        &nats.url(),
        &cluster_config(name),
        &[("KPI__NATS__REPLICAS", "3")],
    )
}

fn tenant(index: usize) -> String {
    format!("t{index:04}")
}

/// What the reference model says of one tenant in June 2025: leads, new customers, spend in
/// cents.
#[derive(Clone, Debug, Default, PartialEq)]
struct Expected {
    leads: u64,
    customers: u64,
    spend_cents: u64,
}

/// The `step`th events of a tenant: a lead, every third step a deal won by a new customer,
/// every second step a spend report for its own day and account, restated once (the later
/// report wins); with a duplicate of the lead under another message id.
fn events_of(tenant: &str, step: usize) -> Vec<(String, String, Option<String>)> {
    let day = 1 + step % 28;
    let time = format!("2025-06-{day:02}T10:00:00Z");
    let mut events = vec![event(
        &format!("{tenant}-l{step}"),
        "lead.created",
        &time,
        tenant,
        json!({"lead_id": format!("L{step}"), "channel": "paid_search"}),
    )];
    // The same event again (a producer's retry past the duplicate window): applied once.
    let mut duplicate = events[0].clone();
    duplicate.2 = Some(format!("{tenant}-l{step}-again"));
    events.push(duplicate);
    if step.is_multiple_of(3) {
        events.push(event(
            &format!("{tenant}-d{step}"),
            "deal.won",
            &format!("2025-06-{day:02}T12:00:00Z"),
            tenant,
            json!({"deal_id": format!("D{step}"), "customer_id": format!("C{step}"), "lead_id": format!("L{step}"), "amount": "100.00", "currency": "EUR"}),
        ));
    }
    if step.is_multiple_of(2) {
        for (version, cents, hour) in [(0, 1000 + step, 20), (1, 2000 + step, 23)] {
            events.push(event(
                &format!("{tenant}-s{step}-{version}"),
                "spend.reported",
                &format!("2025-06-{day:02}T{hour}:00:00Z"),
                tenant,
                json!({"date": format!("2025-06-{day:02}"), "amount": format!("{}.{:02}", cents / 100, cents % 100), "currency": "EUR", "channel": "paid_search", "source": "google_ads", "account": format!("a{step}")}),
            ));
        }
    }
    events
}

fn expected_after(steps: usize) -> Expected {
    let mut expected = Expected::default();
    for step in 0..steps {
        expected.leads += 1;
        if step.is_multiple_of(3) {
            expected.customers += 1;
        }
        if step.is_multiple_of(2) {
            expected.spend_cents += 2000 + step as u64;
        }
    }
    expected
}

fn cents(text: &str) -> u64 {
    let (units, fraction) = text.split_once('.').unwrap_or((text, "0"));
    let fraction = format!("{fraction:0<2}");
    units.parse::<u64>().unwrap() * 100 + fraction[..2].parse::<u64>().unwrap()
}

fn figures(body: &Value) -> Expected {
    Expected {
        leads: body["total"]["leads"].as_u64().unwrap_or(0),
        customers: body["total"]["new_customers"].as_u64().unwrap_or(0),
        spend_cents: body["total"]["spend"].as_str().map(cents).unwrap_or(0),
    }
}

/// Publishes every tenant's steps round after round (a few hundred events a second), each
/// message retried with its `Nats-Msg-Id` until JetStream acknowledges it; returns the steps
/// published per tenant.
async fn publisher(
    client: async_nats::Client,
    stop: Arc<AtomicBool>,
    rounds: usize,
) -> BTreeMap<String, usize> {
    let js = async_nats::jetstream::new(client);
    let mut steps: BTreeMap<String, usize> = BTreeMap::new();
    // About 300 events a second: a step is 3.5 events on average.
    let mut pace = tokio::time::interval(Duration::from_millis(12));
    'rounds: for step in 0..rounds {
        for index in 0..TENANTS {
            if stop.load(Ordering::SeqCst) {
                break 'rounds;
            }
            pace.tick().await;
            let name = tenant(index);
            let sends = events_of(&name, step)
                .into_iter()
                .map(|(subject, payload, id)| {
                    let js = js.clone();
                    async move {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Msg-Id", id.as_deref().unwrap());
                        loop {
                            let sent = js
                                .publish_with_headers(
                                    subject.clone(),
                                    headers.clone(),
                                    bytes::Bytes::from(payload.clone()),
                                )
                                .await;
                            if let Ok(ack) = sent {
                                if let Ok(Ok(_)) =
                                    tokio::time::timeout(Duration::from_secs(5), ack).await
                                {
                                    return;
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                });
            futures_util::future::join_all(sends).await;
            steps.insert(name, step + 1);
        }
    }
    steps
}

/// What the watcher saw while engines came and went.
#[derive(Default)]
struct Watch {
    /// (partition, engines) seen exported by two engines in one sweep of scrapes.
    doubles: Vec<(String, Vec<String>)>,
    /// Answers other than 200, or 503 with `Retry-After`.
    bad_answers: Vec<String>,
    /// Longest run of 503 answers per tenant, from the first to the last in a row.
    longest_unavailable: Duration,
    /// Figures that went down: an engine answering from a copy behind another's.
    went_back: Vec<String>,
    sweeps: usize,
    answers: usize,
    unavailable_answers: usize,
    /// 503 answers per engine and second of the watch.
    unavailable_at: BTreeMap<(String, u64), usize>,
}

type Live = Arc<Mutex<Vec<(String, String)>>>;

/// Scrapes every live engine and asks each for a sample of tenants, again and again.
async fn watcher(live: Live, stop: Arc<AtomicBool>) -> Watch {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let sample: Vec<String> = (0..TENANTS).step_by(97).map(tenant).collect();
    let mut watch = Watch::default();
    let watched = Instant::now();
    let mut highest: BTreeMap<String, Expected> = BTreeMap::new();
    // (engine, tenant) answering 503: since the first such answer in a row, to the last.
    let mut unavailable: BTreeMap<(String, String), (Instant, Instant)> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        let engines = live.lock().unwrap().clone();
        // An engine stopped or killed answers no more: its run of 503s ended at its last one.
        unavailable.retain(|(name, _), (first, last)| {
            let live = engines.iter().any(|(engine, _)| engine == name);
            if !live {
                watch.longest_unavailable = watch.longest_unavailable.max(*last - *first);
            }
            live
        });
        let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        // Every engine scraped at the same moment, as one Prometheus scrape interval would.
        let scrapes = futures_util::future::join_all(engines.iter().map(|(name, base)| {
            let http = http.clone();
            async move {
                let text = match http.get(format!("{base}/metrics")).send().await {
                    Ok(response) => response.text().await.ok(),
                    Err(_) => None,
                };
                (name, text)
            }
        }))
        .await;
        for (name, text) in scrapes {
            let Some(text) = text else { continue };
            for partition in 0..PARTITIONS {
                let label = partition.to_string();
                if metric_value(
                    &text,
                    "kpi_engine_partition_owned",
                    &[("engine", name), ("partition", &label)],
                ) == Some(1.0)
                {
                    owners.entry(label).or_default().push(name.clone());
                }
            }
        }
        for (partition, names) in owners {
            if names.len() > 1 {
                watch.doubles.push((partition, names));
            }
        }
        for (name, base) in &engines {
            for tenant in &sample {
                let url = format!("{base}/api/v1/kpis?tenant={tenant}&period=2025-06");
                let Ok(response) = http.get(&url).send().await else {
                    continue;
                };
                watch.answers += 1;
                let status = response.status().as_u16();
                let retry_after = response.headers().contains_key("retry-after");
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let key = (name.clone(), tenant.clone());
                match status {
                    200 => {
                        if let Some((first, _)) = unavailable.remove(&key) {
                            watch.longest_unavailable =
                                watch.longest_unavailable.max(first.elapsed());
                        }
                        let seen = figures(&body);
                        let best = highest.entry(tenant.clone()).or_default();
                        if seen.leads < best.leads || seen.customers < best.customers {
                            watch.went_back.push(format!(
                                "{name} answered {tenant} with {seen:?} after {best:?}"
                            ));
                        } else {
                            *best = seen;
                        }
                    }
                    404 if highest.get(tenant).is_none_or(|best| best.leads == 0) => {}
                    503 if retry_after && body["error"].is_string() => {
                        watch.unavailable_answers += 1;
                        *watch
                            .unavailable_at
                            .entry((name.clone(), watched.elapsed().as_secs()))
                            .or_default() += 1;
                        let now = Instant::now();
                        unavailable.entry(key).or_insert((now, now)).1 = now;
                    }
                    other => watch
                        .bad_answers
                        .push(format!("{name} {tenant}: {other} {body}")),
                }
            }
        }
        watch.sweeps += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (first, _) in unavailable.values() {
        watch.longest_unavailable = watch.longest_unavailable.max(first.elapsed());
    }
    watch
}

/// Waits until `engine` answers `tenant`'s figures as `want` (a minute at most).
async fn agrees(engine: &Engine, name: &str, tenant: String, want: Expected) {
    let url = format!("/api/v1/kpis?tenant={tenant}&period=2025-06");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = engine.get(&url).await;
        if (status == 200 && figures(&body) == want) || (want.leads == 0 && status == 404) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {tenant} wants {want:?}, got {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn owned(engine: &Engine, name: &str) -> BTreeSet<u32> {
    partitions_at_one(engine, name, "kpi_engine_partition_owned").await
}

/// The partitions `engine` follows as a caught-up standby, as its /metrics says.
async fn standing(engine: &Engine, name: &str) -> BTreeSet<u32> {
    partitions_at_one(engine, name, "kpi_engine_partition_standby").await
}

/// The partitions whose `gauge{engine,partition}` is 1 on `engine`'s /metrics.
async fn partitions_at_one(engine: &Engine, name: &str, gauge: &str) -> BTreeSet<u32> {
    let Ok(response) = reqwest::get(format!("{}/metrics", engine.base())).await else {
        return BTreeSet::new();
    };
    let text = response.text().await.unwrap_or_default();
    (0..PARTITIONS)
        .filter(|p| {
            metric_value(
                &text,
                gauge,
                &[("engine", name), ("partition", &p.to_string())],
            ) == Some(1.0)
        })
        .collect()
}

/// Waits until the engines own every partition once, each an even share; returns how long
/// it took.
async fn settled(engines: &[(&Engine, &str)], timeout: Duration) -> Duration {
    let started = Instant::now();
    let share = (PARTITIONS as usize).div_ceil(engines.len());
    loop {
        let mut all = Vec::new();
        let mut even = true;
        for (engine, name) in engines {
            let mine = owned(engine, name).await;
            even &= !mine.is_empty() && mine.len() <= share;
            all.extend(mine);
        }
        all.sort();
        if even && all == (0..PARTITIONS).collect::<Vec<_>>() {
            return started.elapsed();
        }
        if started.elapsed() >= timeout {
            let logs: Vec<String> = engines
                .iter()
                .map(|(engine, name)| {
                    let log = engine.log();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    format!("--- {name}, last lines of its log:\n{}", tail.join("\n"))
                })
                .collect();
            panic!(
                "the engines did not share the partitions within {timeout:?}: {all:?}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_share_partitions_and_survive_kills_joins_and_a_lost_nats_node() {
    let started = Instant::now();
    let phase = |what: &str| println!("cluster test, {:>6.1?}: {what}", started.elapsed());
    let mut nats = NatsCluster::start(3);
    nats.wait_ready().await;
    let mut a = start_engine(&nats, "kpi-a");
    let mut b = start_engine(&nats, "kpi-b");
    let mut c = start_engine(&nats, "kpi-c");
    for engine in [&mut a, &mut b, &mut c] {
        engine.wait_ready().await;
    }
    settled(
        &[(&a, "kpi-a"), (&b, "kpi-b"), (&c, "kpi-c")],
        Duration::from_secs(30),
    )
    .await;

    let live: Live = Arc::new(Mutex::new(vec![
        ("kpi-a".into(), a.base()),
        ("kpi-b".into(), b.base()),
        ("kpi-c".into(), c.base()),
    ]));
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let stop_watching = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn(publisher(
        nats.client().await,
        stop_publishing.clone(),
        1000,
    ));
    let watching = tokio::spawn(watcher(live.clone(), stop_watching.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;

    phase("publishing; kill -9 of kpi-a");
    // kill -9 of an engine: the others take its partitions over.
    live.lock().unwrap().retain(|(name, _)| name != "kpi-a");
    let killed = Instant::now();
    a.kill9();
    settled(&[(&b, "kpi-b"), (&c, "kpi-c")], Duration::from_secs(60)).await;
    let takeover = killed.elapsed();

    phase("kpi-b and kpi-c took over; kpi-d joins");
    // A fourth engine joins: the partitions are shared again.
    let mut d = start_engine(&nats, "kpi-d");
    let joined = Instant::now();
    d.wait_ready().await;
    settled(
        &[(&b, "kpi-b"), (&c, "kpi-c"), (&d, "kpi-d")],
        Duration::from_secs(60),
    )
    .await;
    let rebalance = joined.elapsed();
    live.lock().unwrap().push(("kpi-d".into(), d.base()));
    tokio::time::sleep(Duration::from_secs(3)).await;

    phase("rebalanced; kill -9 of the stream leader's node");
    // kill -9 of the stream leader's NATS node, then it comes back.
    let js = async_nats::jetstream::new(nats.client().await);
    let leader = js
        .get_stream("KPI_EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .and_then(|cluster| cluster.leader)
        .expect("the stream has a leader");
    let node = nats.node_index(&leader).expect("a node of ours leads");
    nats.kill_node(node);
    tokio::time::sleep(Duration::from_secs(4)).await;
    nats.start_node(node);
    tokio::time::sleep(Duration::from_secs(4)).await;

    phase("node back; kpi-b stops");
    // A graceful stop: its partitions move at once.
    live.lock().unwrap().retain(|(name, _)| name != "kpi-b");
    assert!(
        b.stop().success(),
        "kpi-b did not stop cleanly:\n{}",
        b.log()
    );
    settled(&[(&c, "kpi-c"), (&d, "kpi-d")], Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop_publishing.store(true, Ordering::SeqCst);
    let steps = publishing.await.unwrap();
    let published: usize = steps.values().sum();
    assert!(
        published >= TENANTS,
        "the publisher got only {published} steps out"
    );

    phase("published; checking every tenant");
    // Every tenant's figures, from every engine, equal the reference.
    for (engine, name) in [(&c, "kpi-c"), (&d, "kpi-d")] {
        let checks = (0..TENANTS).map(|index| {
            let tenant = tenant(index);
            let want = expected_after(steps.get(&tenant).copied().unwrap_or(0));
            agrees(engine, name, tenant, want)
        });
        futures_util::stream::iter(checks)
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
    }
    phase("checked");
    // Duplicates were counted once each, by the partition's owner only: summed over the
    // engines, the processed lead events are the leads.
    let mut processed = 0.0;
    for engine in [&c, &d] {
        processed += metric_series(&engine.metrics().await, "kpi_events_processed_total")
            .into_iter()
            .filter(|(labels, _)| {
                labels.get("type").map(String::as_str) == Some("lead.created")
                    && labels.get("tenant").is_some_and(|t| t.starts_with('t'))
            })
            .map(|(_, value)| value)
            .sum::<f64>();
    }
    assert_eq!(
        processed as usize, published,
        "processed lead.created over both engines"
    );
    stop_watching.store(true, Ordering::SeqCst);
    let watch = watching.await.unwrap();
    for (engine, name) in [(&b, "kpi-b"), (&c, "kpi-c"), (&d, "kpi-d")] {
        let moves: Vec<String> = engine
            .log()
            .lines()
            .filter(|line| {
                [
                    "took the partition",
                    "caught up",
                    "gave the partition",
                    "lost the partition",
                ]
                .iter()
                .any(|m| line.contains(m))
            })
            .map(str::to_string)
            .collect();
        println!("{name}:\n{}", moves.join("\n"));
    }
    println!(
        "503 answers (engine, second of the watch): {:?}",
        watch.unavailable_at
    );
    println!(
        "cluster: {published} steps of {TENANTS} tenants; takeover after kill -9 {takeover:?}, rebalance on join {rebalance:?}; {} sweeps, {} answers, {} of them 503, longest unavailability of a tenant {:?}",
        watch.sweeps, watch.answers, watch.unavailable_answers, watch.longest_unavailable
    );
    assert!(
        watch.doubles.is_empty(),
        "partitions exported by two engines at once: {:?}",
        watch.doubles
    );
    assert!(
        watch.bad_answers.is_empty(),
        "answers other than 200 or 503 with Retry-After: {:?}",
        &watch.bad_answers[..watch.bad_answers.len().min(10)]
    );
    assert!(
        watch.went_back.is_empty(),
        "stale answers: {:?}",
        &watch.went_back[..watch.went_back.len().min(10)]
    );
    assert!(
        watch.sweeps > 20,
        "the watcher swept {} times only",
        watch.sweeps
    );
    assert!(
        watch.longest_unavailable < Duration::from_secs(30),
        "a tenant was unavailable for {:?}",
        watch.longest_unavailable
    );
    assert!(
        takeover < Duration::from_secs(30),
        "takeover took {takeover:?}"
    );

    // Standbys (on by default): each partition is followed, caught up, by the engine that is
    // not its owner.
    let every: BTreeSet<u32> = (0..PARTITIONS).collect();
    kpi_tests::wait_until(
        "each partition has its standby",
        Duration::from_secs(60),
        || async {
            let (owned_c, standing_c) = (owned(&c, "kpi-c").await, standing(&c, "kpi-c").await);
            let (owned_d, standing_d) = (owned(&d, "kpi-d").await, standing(&d, "kpi-d").await);
            owned_c == standing_d
                && owned_d == standing_c
                && owned_c.union(&owned_d).copied().collect::<BTreeSet<u32>>() == every
                && owned_c.is_disjoint(&owned_d)
        },
    )
    .await;
}

/// Waits for an engine that should refuse to start; returns its log.
fn refused(engine: &mut Engine) -> String {
    let status = engine.wait_exit();
    let log = engine.log();
    assert!(!status.success(), "the engine did not refuse:\n{log}");
    log
}

#[tokio::test]
async fn multi_engine_mode_refuses_a_nats_server_older_than_2_11() {
    let binary = debian_nats_server_binary();
    let version = nats_server_version(&binary);
    assert!(
        version < (2, 11),
        "{} is {version:?}: this test needs Debian's 2.9",
        binary.display()
    );
    let nats = NatsServer::start_binary(&binary, None, &[]);
    let mut engine = Engine::start(&nats.url(), &cluster_config("kpi-a"));
    let log = refused(&mut engine);
    assert!(
        log.contains("cluster.enabled") && log.contains("2.11") && log.contains("2.9.10"),
        "the refusal names the setting, the server's version and the one needed:\n{log}"
    );
}

#[tokio::test]
async fn engines_refuse_mismatched_cluster_settings_and_a_single_engine_refuses_a_partitioned_stream(
) {
    let nats = NatsServer::start_binary(&cluster_nats_server_binary(), None, &[]);
    let mut a = Engine::start(&nats.url(), &cluster_config("kpi-a"));
    a.wait_ready().await;

    let mut other_partitions = Engine::start(&nats.url(), &cluster_config_with("kpi-b", 8, 2000));
    let log = refused(&mut other_partitions);
    assert!(
        log.contains("cluster.partitions") && log.contains("16"),
        "names the setting and the number the others have:\n{log}"
    );

    let mut other_lease =
        Engine::start(&nats.url(), &cluster_config_with("kpi-b", PARTITIONS, 3000));
    let log = refused(&mut other_lease);
    assert!(log.contains("cluster.lease_ms"), "{log}");

    let mut same_name = Engine::start(&nats.url(), &cluster_config("kpi-a"));
    let log = refused(&mut same_name);
    assert!(
        log.contains("cluster.engine") && log.contains("`kpi-a`"),
        "names the setting and the name in use:\n{log}"
    );

    let mut single = Engine::start(&nats.url(), "");
    let log = refused(&mut single);
    assert!(
        log.contains("[cluster]") && log.contains("nats.stream"),
        "a single engine on the partitioned stream names [cluster]:\n{log}"
    );

    // The engine that was there kept its partitions throughout.
    assert_eq!(
        owned(&a, "kpi-a").await,
        (0..PARTITIONS).collect::<BTreeSet<u32>>()
    );

    // Two engines started at once under one new name: one takes the name, the other refuses.
    let mut twins = [
        Engine::start(&nats.url(), &cluster_config("kpi-c")),
        Engine::start(&nats.url(), &cluster_config("kpi-c")),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let (refused_twin, status) = loop {
        if let Some(exit) =
            (0..2).find_map(|index| twins[index].exited().map(|status| (index, status)))
        {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "neither engine named kpi-c refused:\n{}\n{}",
            twins[0].log(),
            twins[1].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = twins[refused_twin].log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("cluster.engine") && log.contains("`kpi-c`"),
        "the second engine named kpi-c names the setting:\n{log}"
    );
    let kept = &mut twins[1 - refused_twin];
    kept.wait_ready().await;
    // The one that took the name runs on, a lease and more later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(kept.exited().is_none(), "{}", kept.log());
    kept.stop();

    // The stream deleted and created again: its sequences start over, and a store that
    // applied the old one's would skip the new events. kpi-a refuses its store, naming it.
    assert!(a.stop().success(), "{}", a.log());
    let js = async_nats::jetstream::new(nats.client().await);
    js.delete_stream("KPI_EVENTS").await.unwrap();
    a.start_again();
    let log = refused(&mut a);
    assert!(
        log.contains("store.path") && log.contains("created again"),
        "a store of another stream of the same name is refused, naming store.path:\n{log}"
    );
}

/// The per-tenant figures an engine answers for `tenants`.
async fn answers(engine: &Engine, tenants: &[String]) -> Vec<(String, Expected)> {
    let mut figures_of = Vec::new();
    for tenant in tenants {
        let (status, body) = engine
            .get(&format!("/api/v1/kpis?tenant={tenant}&period=2025-06"))
            .await;
        assert_eq!(status, 200, "{tenant}: {body}");
        figures_of.push((tenant.clone(), figures(&body)));
    }
    figures_of
}

fn rejected_total(metrics: &str) -> f64 {
    metric_series(metrics, "kpi_events_rejected_total")
        .into_iter()
        .map(|(_, value)| value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_engine_install_moves_to_several_engines_with_its_history() {
    let nats = NatsServer::start_binary(&cluster_nats_server_binary(), None, &[]);
    let client = nats.client().await;
    let tenants: Vec<String> = (0..40).map(tenant).collect();
    let history = |steps: std::ops::Range<usize>| {
        let mut events = Vec::new();
        for tenant in &tenants {
            for step in steps.clone() {
                events.extend(events_of(tenant, step));
            }
        }
        events
    };

    // A single engine's history, with an invalid event (a dead letter, counted once).
    let mut single = Engine::start(&nats.url(), "");
    single.wait_ready().await;
    let mut events = history(0..6);
    events.push((
        "kpi.events.t0000.lead.created".into(),
        "{not json".into(),
        Some("broken".into()),
    ));
    publish(&client, &events).await;
    // A subject without an event type: dead-lettered by the single engine, and a subject the
    // partitioned stream does not take, so the migration leaves it out.
    let typeless = vec![(
        "kpi.events.t0001".to_string(),
        "{}".to_string(),
        Some("typeless".to_string()),
    )];
    publish(&client, &typeless).await;
    kpi_tests::wait_until(
        "the single engine applied the history",
        Duration::from_secs(60),
        || drained(&client, "kpi-engine"),
    )
    .await;
    let before = answers(&single, &tenants).await;
    for (tenant, seen) in &before {
        assert_eq!(*seen, expected_after(6), "{tenant} before the migration");
    }
    assert_eq!(rejected_total(&single.metrics().await), 2.0);
    assert!(single.stop().success());

    // The migration, with the cluster's settings.
    let config = single.dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{}\"\n{}",
            nats.url(),
            cluster_config("kpi-a")
        ),
    )
    .unwrap();
    let migrate = || {
        let output = kpi_command()
            .args(["cluster", "migrate", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "kpi cluster migrate failed:\n{text}"
        );
        text
    };
    let text = migrate();
    let stored = events.len() as u64;
    assert!(
        text.contains("now partitioned into 16")
            && text.contains(&format!("{stored} events"))
            && text.contains("1 messages on a subject without an event type"),
        "{text}"
    );

    // The single engine's store is refused in multi-engine mode.
    single.set_extra_config(&cluster_config("kpi-a"));
    single.start_again();
    let log = refused(&mut single);
    assert!(log.contains("store.path"), "{log}");

    // Producers go on publishing, unchanged; engines in multi-engine mode, each from an
    // empty store, rebuild the history and apply the rest.
    publish(&client, &history(6..9)).await;
    let mut a = start_engine_on(&nats.url(), "kpi-a");
    let mut b = start_engine_on(&nats.url(), "kpi-b");
    a.wait_ready().await;
    b.wait_ready().await;
    settled(&[(&a, "kpi-a"), (&b, "kpi-b")], Duration::from_secs(60)).await;
    for (engine, name) in [(&a, "kpi-a"), (&b, "kpi-b")] {
        for tenant in &tenants {
            agrees(engine, name, tenant.clone(), expected_after(9)).await;
        }
    }
    let rejected = rejected_total(&a.metrics().await) + rejected_total(&b.metrics().await);
    assert_eq!(
        rejected, 1.0,
        "the dead letter is counted once, by its partition's owner (the typeless message was left out)"
    );

    // A migration interrupted and run again may store the batch in flight twice: the copy of
    // the invalid event stored again is not dead-lettered or counted again, while a new
    // invalid event after it (same partition, so applied after it) is.
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream("KPI_EVENTS").await.unwrap();
    let mut copies = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: "*.kpi.events.t0000.lead.created".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let copy = loop {
        let message = tokio::time::timeout(Duration::from_secs(10), copies.next())
            .await
            .expect("the copy of the invalid event is in the stream")
            .unwrap()
            .unwrap();
        if message.payload.as_ref() == b"{not json" {
            break message;
        }
    };
    let migrated_from = copy
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Kpi-Migrated-From"))
        .expect("a copy says which original it is")
        .as_str()
        .to_string();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Kpi-Migrated-From", migrated_from.as_str());
    js.publish_with_headers(
        "kpi.events.t0000.lead.created",
        headers,
        copy.payload.clone(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    publish(
        &client,
        &[(
            "kpi.events.t0000.lead.created".to_string(),
            "{still not json".to_string(),
            Some("broken-again".to_string()),
        )],
    )
    .await;
    let rejected_now =
        || async { rejected_total(&a.metrics().await) + rejected_total(&b.metrics().await) };
    kpi_tests::wait_until(
        "the new invalid event is counted",
        Duration::from_secs(30),
        || async { rejected_now().await >= 2.0 },
    )
    .await;
    assert_eq!(
        rejected_now().await,
        2.0,
        "the copy stored twice is counted once, the new invalid event once"
    );

    // No event is left under its old subject, and a second run has nothing to do.
    let left = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: "kpi.events.>".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .num_pending;
    assert_eq!(left, 0, "events still under their unpartitioned subject");
    let text = migrate();
    assert!(
        text.contains("already partitioned") && text.contains("0 events"),
        "{text}"
    );
}

fn start_engine_on(url: &str, name: &str) -> Engine {
    Engine::start(url, &cluster_config(name))
}
