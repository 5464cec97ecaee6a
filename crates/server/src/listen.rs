//! The accept loop of the one listener: HTTP/1.1 and HTTP/2 (h2c) on the
//! same port through hyper's auto builder, the peer address on every
//! request, bounded connections, and graceful shutdown bounded by a grace
//! period.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use keel_edge::listener::ListenerService;
use tokio::net::TcpListener;
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

/// What one keel lets its clients hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long in-flight calls may finish after shutdown begins.
    pub grace: Duration,
    /// Open connections at most; one more is closed at once.
    pub max_connections: usize,
    /// A connection must send its first byte (and an HTTP/1.1 request its
    /// head) within this.
    pub first_byte_timeout: Duration,
}

impl Limits {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            grace: Duration::from_secs(config.shutdown_grace_seconds),
            max_connections: config.max_connections,
            first_byte_timeout: Duration::from_secs(config.first_byte_timeout_seconds),
        }
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
    } = limits;
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Keep-alive pings and header timeouts need a timer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(first_byte_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
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
            tracing::debug!(max_connections, "connection refused: too many open");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(remote),
        };
        let service = service.clone();
        let per_request = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(info.clone());
            service.clone().oneshot(request)
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
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(error = %error, "connection ended with an error");
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
