//! The accept loop of the one listener: HTTP/1.1 and HTTP/2 (h2c) on the
//! same port through hyper's auto builder, the peer address on every
//! request, bounded connections (how many, how long silent, how long idle,
//! HTTP/2's streams, windows and header lists), and graceful shutdown
//! bounded by a grace period.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use keel_edge::listener::ListenerService;
use tokio::net::TcpListener;
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

/// What one keel lets its clients hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long in-flight calls may finish after shutdown begins.
    pub grace: Duration,
    /// Open connections at most; one more is closed at once.
    pub max_connections: usize,
    /// A connection must send its first byte (and an HTTP/1.1 request its
    /// head) within this.
    pub first_byte_timeout: Duration,
    /// A connection with no call in flight for this long is closed
    /// (keep-alive connections between requests, HTTP/2 connections without
    /// streams). An open stream is a call in flight.
    pub idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// Whose forwarded header names the client (`KEEL_TRUSTED_PROXIES`).
    pub proxies: Arc<crate::proxy::TrustedProxies>,
}

/// HTTP/2 bounds besides the configurable stream count: one request's
/// headers, the flow-control windows (what a peer may make keel buffer),
/// and the write buffer per stream. HTTP/1.1's read buffer bounds its request
/// head the same way.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
const HTTP2_STREAM_WINDOW_BYTES: u32 = 1024 * 1024;
const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
const HTTP2_MAX_SEND_BUFFER_BYTES: usize = 400 * 1024;
/// Streams a client may reset before keel has accepted them (the rapid
/// reset attack, CVE-2023-44487), and streams keel may reset for a client's
/// protocol errors, before the connection is closed.
const HTTP2_MAX_PENDING_RESETS: usize = 20;
const HTTP2_MAX_ERROR_RESETS: usize = 256;
const HTTP1_MAX_BUFFER_BYTES: usize = 64 * 1024;
const HTTP1_MAX_HEADERS: usize = 100;

/// At most one "connection limit reached" warning in this long.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(10);

impl Limits {
    pub fn from_config(config: &crate::config::Config) -> Result<Self, crate::config::ConfigError> {
        Ok(Self {
            grace: Duration::from_secs(config.shutdown_grace_seconds),
            max_connections: config.max_connections,
            first_byte_timeout: Duration::from_secs(config.first_byte_timeout_seconds),
            idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
            http2_max_concurrent_streams: config.http2_max_concurrent_streams,
            proxies: Arc::new(config.trusted_proxies()?),
        })
    }
}

pub async fn serve(
    listener: TcpListener,
    service: ListenerService,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) {
    let Limits {
        grace,
        max_connections,
        first_byte_timeout,
        idle_timeout,
        http2_max_concurrent_streams,
        proxies,
    } = limits;
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Keep-alive pings and header timeouts need a timer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(first_byte_timeout)
        .max_buf_size(HTTP1_MAX_BUFFER_BYTES)
        .max_headers(HTTP1_MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(http2_max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
        .max_send_buf_size(HTTP2_MAX_SEND_BUFFER_BYTES)
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(HTTP2_MAX_ERROR_RESETS);
    let mut refused_since_warning = 0u64;
    let mut last_warning: Option<Instant> = None;
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Accepted and closed at once beyond the limit: waiting in the
        // kernel's backlog would hold the client without an answer.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            refused_since_warning += 1;
            if last_warning.is_none_or(|at| at.elapsed() >= LIMIT_WARNING_EVERY) {
                tracing::warn!(
                    max_connections,
                    refused = refused_since_warning,
                    "connection limit reached (KEEL_MAX_CONNECTIONS): new connections are closed at once"
                );
                refused_since_warning = 0;
                last_warning = Some(Instant::now());
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(remote),
        };
        let service = service.clone();
        let activity = Activity::new();
        let calls = activity.clone();
        let proxies = proxies.clone();
        let per_request = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            // What every layer after this one reads as the caller's address
            // (limits, sessions, audit): the peer, or behind a trusted
            // proxy the client it names.
            let mut info = info.clone();
            if !proxies.is_empty() {
                info.remote_addr = Some(std::net::SocketAddr::new(
                    proxies.client(remote.ip(), request.headers()),
                    0,
                ));
            }
            request.extensions_mut().insert(info);
            // In flight until the answer's body has ended: a stream is a
            // call for as long as it lasts, whether or not it sends.
            let in_flight = calls.call_started();
            let answer = service.clone().oneshot(request);
            async move {
                let response = answer.await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    axum::body::Body::new(InFlightBody {
                        inner: body,
                        _in_flight: in_flight,
                    })
                }))
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // The permit is this connection's slot until it ends.
            let _permit = permit;
            // A connection that never says anything is closed: HTTP/1.1's
            // header timeout only starts once a request began, and h2c's
            // preface has none.
            let mut first = [0u8; 1];
            match tokio::time::timeout(first_byte_timeout, stream.peek(&mut first)).await {
                Ok(Ok(read)) if read > 0 => {}
                Ok(_) => return,
                Err(_) => {
                    tracing::debug!(peer = %remote, "connection closed: nothing sent in time");
                    return;
                }
            }
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), per_request)
                .into_owned();
            let served = watcher.watch(connection);
            tokio::pin!(served);
            loop {
                tokio::select! {
                    result = &mut served => {
                        if let Err(error) = result {
                            tracing::debug!(error = %error, "connection ended with an error");
                        }
                        return;
                    }
                    () = tokio::time::sleep(activity.idle_left(idle_timeout)) => {
                        if activity.idle_left(idle_timeout).is_zero() {
                            // Dropping the connection closes the socket.
                            tracing::debug!(peer = %remote, "connection closed: idle");
                            return;
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_seconds = grace.as_secs(), "calls still in flight after the grace period; closing them");
        }
    }
}

/// When a connection last started or finished a call, and how many it has
/// in flight (an answer counts until its body ended). Bytes alone do not
/// count: HTTP/2 keep-alive pings would keep every connection busy.
#[derive(Clone)]
struct Activity(Arc<ActivityState>);

struct ActivityState {
    since: Instant,
    /// Milliseconds after `since` of the last call's start or end.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

/// One call in flight, until dropped.
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn new() -> Self {
        Self(Arc::new(ActivityState {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }))
    }

    fn touch(&self) {
        let now = self.0.since.elapsed().as_millis() as u64;
        self.0.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn call_started(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// How much longer the connection may stay idle: zero once it has had
    /// no call in flight for `timeout`.
    fn idle_left(&self, timeout: Duration) -> Duration {
        if self.0.in_flight.load(Ordering::Relaxed) > 0 {
            return timeout;
        }
        let last = Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed));
        (last + timeout).saturating_sub(self.0.since.elapsed())
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that holds its call's [`InFlight`] until it ends.
    struct InFlightBody<B> {
        #[pin]
        inner: B,
        _in_flight: InFlight,
    }
}

impl<B: http_body::Body> http_body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
