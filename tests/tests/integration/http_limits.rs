//! No client can hold the HTTP server or its memory: answers are bounded and paged, idle and
//! slow connections are closed, requests have a deadline, a concurrency limit and a body
//! limit, and health probes are answered whatever else is going on.

use std::time::{Duration, Instant};

use kpi_tests::{drained, event, publish, wait_until, Engine, NatsServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn answers_hold_at_most_max_rows_and_page_through_the_rest() {
    let nats = NatsServer::start();
    let mut engine = Engine::start_with_env(&nats.url(), "", &[("KPI__HTTP__MAX_ROWS", "100")]);
    engine.wait_ready().await;
    let client = nats.client().await;
    // 250 channels and 250 campaigns in one tenant.
    let leads: Vec<_> = (0..250)
        .map(|n| {
            event(
                &format!("w{n}"),
                "lead.created",
                "2025-06-01T10:00:00Z",
                "wide",
                json!({"lead_id": format!("L{n}"), "channel": format!("ch-{n:03}")}),
            )
        })
        .chain((0..250).map(|n| {
            event(
                &format!("s{n}"),
                "spend.reported",
                "2025-06-01T10:00:00Z",
                "wide",
                json!({"date": "2025-06-01", "amount": "1", "currency": "EUR", "campaign": format!("camp-{n:03}")}),
            )
        }))
        .collect();
    publish(&client, &leads).await;
    wait_until("drained", Duration::from_secs(30), || {
        drained(&client, "kpi-engine")
    })
    .await;

    let (status, first) = engine.get("/api/v1/kpis?tenant=wide&period=all").await;
    assert_eq!(status, 200);
    assert_eq!(first["channels"].as_object().unwrap().len(), 100);
    assert_eq!(first["campaigns"].as_object().unwrap().len(), 100);
    assert_eq!(
        first["page"],
        json!({"offset": 0, "limit": 100, "totals": {"channels": 250, "campaigns": 250}, "next_offset": 100})
    );
    assert!(first["channels"]["ch-000"].is_object() && first["channels"]["ch-099"].is_object());
    // The total is always the whole tenant's.
    assert_eq!(first["total"]["leads"], 250);
    assert_eq!(first["total"]["spend"], "250.00");

    let (_, last) = engine
        .get("/api/v1/kpis?tenant=wide&period=all&offset=200")
        .await;
    assert_eq!(last["channels"].as_object().unwrap().len(), 50);
    assert!(last["channels"]["ch-249"].is_object());
    assert_eq!(last["page"]["next_offset"], Value::Null);
    let (_, small) = engine
        .get("/api/v1/kpis?tenant=wide&period=all&limit=10&offset=5")
        .await;
    let names: Vec<&String> = small["channels"].as_object().unwrap().keys().collect();
    assert_eq!(names.first().map(|n| n.as_str()), Some("ch-005"));
    assert_eq!(names.len(), 10);

    for (query, field) in [
        ("limit=101", "limit"),
        ("limit=0", "limit"),
        ("offset=-1", "offset"),
    ] {
        let (status, body) = engine
            .get(&format!("/api/v1/kpis?tenant=wide&period=all&{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"].as_str().unwrap().starts_with(field), "{body}");
    }
    // `kpi report` reads every page.
    let report = kpi_tests::kpi_command()
        .args([
            "report", "--tenant", "wide", "--period", "all", "--json", "--url",
        ])
        .arg(engine.base())
        .output()
        .unwrap();
    assert!(report.status.success(), "{report:?}");
    let merged: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(merged["channels"].as_object().unwrap().len(), 250);
    assert_eq!(merged["campaigns"].as_object().unwrap().len(), 250);
    assert!(merged.get("page").is_none());

    // A small tenant's answer is unchanged: no page.
    publish(
        &client,
        &[event(
            "n1",
            "lead.created",
            "2025-06-01T10:00:00Z",
            "narrow",
            json!({"lead_id": "N1", "channel": "seo"}),
        )],
    )
    .await;
    wait_until("narrow known", Duration::from_secs(20), || async {
        engine.get("/api/v1/kpis?tenant=narrow&period=all").await.0 == 200
    })
    .await;
    let (_, narrow) = engine.get("/api/v1/kpis?tenant=narrow&period=all").await;
    assert!(narrow.get("page").is_none(), "{narrow}");
    let (_, tenants) = engine.get("/api/v1/tenants?limit=1").await;
    assert_eq!(tenants["tenants"], json!(["narrow"]));
    assert_eq!(tenants["page"]["totals"]["tenants"], 2);
}

/// Whether the server closed `stream`: a read returns end-of-file (or a reset).
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 512];
    loop {
        match tokio::time::timeout(Duration::from_millis(10), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or another answer before the close: read on.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn idle_and_slow_connections_are_closed_and_the_server_keeps_answering() {
    let nats = NatsServer::start();
    let mut engine = Engine::start_with_env(
        &nats.url(),
        "",
        &[
            ("KPI__HTTP__IDLE_TIMEOUT_MS", "1000"),
            ("KPI__HTTP__MAX_CONNECTIONS", "40"),
        ],
    );
    engine.wait_ready().await;
    let address = format!("127.0.0.1:{}", engine.port);
    // 120 connections, three times the bound: a third send nothing, a third half a request
    // (slowloris), a third one request and then stay open (kept alive, idle).
    let mut connections = Vec::new();
    for n in 0..120 {
        let mut stream = TcpStream::connect(&address).await.unwrap();
        match n % 3 {
            0 => {}
            1 => stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap(),
            _ => stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap(),
        }
        connections.push(stream);
    }
    let started = Instant::now();
    let mut open: Vec<TcpStream> = connections;
    while !open.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} connections still held open",
            open.len()
        );
        let mut still = Vec::new();
        for mut stream in open {
            if !closed_by_server(&mut stream).await {
                still.push(stream);
            }
        }
        open = still;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = engine.get("/healthz").await;
    assert_eq!(status, 200);
    let (status, _) = engine.get("/api/v1/tenants").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn requests_have_a_deadline_a_concurrency_limit_and_a_body_limit() {
    let nats = NatsServer::start();
    let config = r#"
[[connectors]]
id = "events"
kind = "webhook"
tenant = "hooks"
every = "1h"
[connectors.params]
secret = "another-secret-of-16+"
"#;
    let mut engine = Engine::start_with_env(
        &nats.url(),
        config,
        &[
            ("KPI__HTTP__REQUEST_TIMEOUT_MS", "2000"),
            ("KPI__HTTP__MAX_CONCURRENT_REQUESTS", "2"),
            ("KPI__HTTP__MAX_BODY_BYTES", "4096"),
        ],
    );
    engine.wait_ready().await;
    let signed = |body: &str| {
        kpi_connect::kinds::webhook::sign(
            "another-secret-of-16+",
            kpi_tests::wall_clock().timestamp(),
            body.as_bytes(),
        )
    };
    let post = |body: String| {
        let url = format!("{}/webhooks/events", engine.base());
        let signature = signed(&body);
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("X-Kpi-Signature", signature)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, retry_after, body)
        }
    };
    let (status, _, _) = post("x".repeat(8 * 1024)).await;
    assert_eq!(status, 413, "a body over max_body_bytes");

    // Without NATS a webhook waits for JetStream: the deadline answers for it.
    drop(nats);
    let lead = r#"{"specversion":"1.0","id":"w1","source":"s","type":"lead.created","time":"2025-06-01T10:00:00Z","data":{"lead_id":"L1"}}"#;
    let slow = (
        tokio::spawn(post(lead.to_string())),
        tokio::spawn(post(lead.to_string())),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let (status, retry_after, body) = post(lead.to_string()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many requests"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "refused at once, not queued"
    );
    // Health probes are answered meanwhile.
    let (status, _) = engine.get("/healthz").await;
    assert_eq!(status, 200);
    for task in [slow.0, slow.1] {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("request timed out after 2000 ms"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answers_loses_its_connection() {
    let nats = NatsServer::start();
    let mut engine =
        Engine::start_with_env(&nats.url(), "", &[("KPI__HTTP__IDLE_TIMEOUT_MS", "1000")]);
    engine.wait_ready().await;
    // 2,000 requests pipelined on one connection with a tiny receive buffer, then nothing is
    // read: the server's writes stall.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket
        .connect(format!("127.0.0.1:{}", engine.port).parse().unwrap())
        .await
        .unwrap();
    let requests = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    stream.write_all(requests.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The server closed it: what was already on its way arrives, then the end, well before
    // the 2,000 answers.
    let mut received = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the connection was still open");
    let answers = String::from_utf8_lossy(&received)
        .matches("HTTP/1.1 200")
        .count();
    assert!(
        answers < 2000,
        "{answers} answers: the stalled connection was not closed"
    );
    let (status, _) = engine.get("/healthz").await;
    assert_eq!(status, 200);
}
