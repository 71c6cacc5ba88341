//! The HTTP server loop: accepting connections (plain or TLS) under limits no client can
//! exhaust, and shutting down within a deadline.
//!
//! - at most `max_connections` connections are open; the next ones wait in the listen
//!   backlog;
//! - a connection that sends no complete request headers within `idle_timeout` (a slow client,
//!   or a kept-alive connection left idle), or that stops reading what it is sent for as long,
//!   is closed;
//! - a request that takes longer than `request_timeout` is answered 503; at most
//!   `max_concurrent_requests` are handled at once, the next ones are answered 503 with
//!   `Retry-After` (health probes are always answered); a body over `max_body_bytes` is
//!   answered 413;
//! - on shutdown the listener closes, every connection is asked to finish its request in flight
//!   and close, and connections still open after `shutdown_timeout` are dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// The server's limits (`[http]` of the configuration).
#[derive(Clone, Debug)]
pub struct Limits {
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_concurrent_requests: usize,
    pub max_body_bytes: usize,
    pub max_rows: usize,
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_concurrent_requests: 64,
            max_body_bytes: 1024 * 1024,
            max_rows: 1000,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn unavailable(message: &str, retry_after_s: Option<u64>) -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response();
    if let Some(seconds) = retry_after_s {
        if let Ok(value) = seconds.to_string().parse() {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

/// Middleware: 503 past the request timeout.
async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => unavailable(
            &format!("request timed out after {} ms", limit.as_millis()),
            None,
        ),
    }
}

/// Middleware: 503 with `Retry-After` when `max_concurrent_requests` are in flight.
async fn concurrency_limit(
    State(permits): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    match permits.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => unavailable("too many requests at once; retry shortly", Some(1)),
    }
}

/// Wraps the routes (health probes aside, see [`crate::router`]) in the request limits.
pub fn limited(routes: Router, limits: &Limits) -> Router {
    routes
        .layer(axum::middleware::from_fn_with_state(
            limits.request_timeout,
            time_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            concurrency_limit,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
}

/// Serves `app` on `listener` until `shutdown` turns true.
pub async fn run(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let acceptor = tls.map(TlsAcceptor::from);
    let mut tasks = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before accept: wait a
                    // little rather than spin.
                    debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let app = app.clone();
        let acceptor = acceptor.clone();
        let stop = shutdown.clone();
        let idle_timeout = limits.idle_timeout;
        tasks.spawn(async move {
            let _permit = permit;
            match acceptor {
                None => serve_connection(stream, peer, app, idle_timeout, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => serve_connection(tls, peer, app, idle_timeout, stop).await,
                        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    // Every connection saw the shutdown: it finishes its request in flight, then closes.
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = tasks.len(),
            timeout_ms = limits.shutdown_timeout.as_millis() as u64,
            "HTTP connections still open at the shutdown deadline: closed"
        );
        tasks.shutdown().await;
    }
    Ok(())
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    app: Router,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .keep_alive(true);
    let stream = WriteDeadline::new(stream, idle_timeout);
    let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(%peer, %error, "connection closed");
            }
        }
        () = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            if let Err(error) = connection.await {
                debug!(%peer, %error, "connection closed at shutdown");
            }
        }
    }
}

/// A stream whose writes fail once they have made no progress for `limit`: a client that
/// stops reading its answers cannot hold its connection (and its slot of `max_connections`).
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After a write made no progress: pending until `limit` has passed since the first one.
    fn stall<T>(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match std::future::Future::poll(timer.as_mut(), cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.inner).poll_write(cx, buf) {
            std::task::Poll::Pending => self.stall(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_flush(cx) {
            std::task::Poll::Pending => self.stall(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
