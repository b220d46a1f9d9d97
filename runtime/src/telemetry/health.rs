//! A node's health and its HTTP and gRPC endpoints: `/metrics` (OpenMetrics text, which
//! Prometheus scrapes), `/livez`, `/readyz`, and the gRPC health service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;

use super::Metrics;

/// Readiness: models warm, consumer in its group, a healthy inference worker, not draining, and
/// nothing that stops the node (a partition's spent restart budget, a fatal consumer error).
#[derive(Debug)]
pub struct Health {
    pub models_ready: AtomicBool,
    pub joined: AtomicBool,
    pub draining: AtomicBool,
    /// At least one inference worker is healthy (the node checks each second).
    pub workers_healthy: AtomicBool,
    /// Why the node is stopping on an error.
    failed: std::sync::Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            models_ready: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            workers_healthy: AtomicBool::new(true),
            failed: std::sync::Mutex::new(None),
        }
    }
}

impl Health {
    pub fn ready(&self) -> bool {
        self.reason() == "ready"
    }

    /// The node cannot go on (it is stopping with this error); the first reason stays.
    pub fn set_failed(&self, reason: &str) {
        self.failed.lock().unwrap().get_or_insert_with(|| reason.to_owned());
    }

    /// Why the node is not ready (`ready` when it is), for the `/readyz` body.
    pub fn reason(&self) -> String {
        if let Some(failed) = self.failed.lock().unwrap().as_ref() {
            format!("failed: {failed}")
        } else if self.draining.load(Ordering::SeqCst) {
            "draining".into()
        } else if !self.models_ready.load(Ordering::SeqCst) {
            "models loading".into()
        } else if !self.workers_healthy.load(Ordering::SeqCst) {
            "no healthy inference worker".into()
        } else if !self.joined.load(Ordering::SeqCst) {
            "joining the consumer group".into()
        } else {
            "ready".into()
        }
    }
}

/// Serve `/metrics`, `/livez` and `/readyz` on `addr` until the process ends. Returns the bound
/// address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<SocketAddr> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let ready = health.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        // prometheus-client writes OpenMetrics text (`_total` samples of a
                        // counter family, `# UNIT`, `# EOF`); Prometheus scrapes it as such.
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render().await,
                    )
                }
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let h = ready.clone();
                async move {
                    let code = if h.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                    (code, format!("{}\n", h.reason()))
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP endpoint stopped");
        }
    });
    tracing::info!(%bound, "serving /metrics, /livez, /readyz");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_warm_joined_served_and_not_draining_or_failed() {
        let h = Health::default();
        assert!(!h.ready());
        assert_eq!(h.reason(), "models loading");
        h.models_ready.store(true, Ordering::SeqCst);
        assert_eq!(h.reason(), "joining the consumer group");
        h.joined.store(true, Ordering::SeqCst);
        assert!(h.ready());
        h.workers_healthy.store(false, Ordering::SeqCst);
        assert_eq!(h.reason(), "no healthy inference worker");
        h.workers_healthy.store(true, Ordering::SeqCst);
        h.draining.store(true, Ordering::SeqCst);
        assert!(!h.ready());
        assert_eq!(h.reason(), "draining");
        h.set_failed("partition 3 failed");
        h.set_failed("a later reason");
        assert_eq!(h.reason(), "failed: partition 3 failed");
    }
}
