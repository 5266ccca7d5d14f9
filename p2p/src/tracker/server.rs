//! The tracker's HTTP server.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State as AxumState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::api::{AnnounceRequest, AnnounceResponse, PublishRequest, ReportRequest};
use super::state::{PublishError, State};
use crate::digest::Digest;

/// Peers announce blobs they have complete this many times less often than ones they are
/// downloading.
pub const COMPLETE_ANNOUNCE_FACTOR: u32 = 5;

/// `[tracker]` config section.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackerConfig {
    /// Address to listen on.
    pub listen: String,
    /// Most peers returned per announce.
    pub max_peers: usize,
    /// Most nodes allowed to back-source one blob at once when no seed is alive.
    pub max_backsourcers: usize,
    /// How often peers should announce.
    pub announce_interval_ms: u64,
    /// A peer silent for this long is forgotten; so is its back-source lease.
    pub peer_ttl_ms: u64,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7070".into(),
            max_peers: 16,
            max_backsourcers: 2,
            announce_interval_ms: 1000,
            peer_ttl_ms: 15_000,
        }
    }
}

impl TrackerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_peers == 0 {
            return Err("tracker.max_peers must be at least 1".into());
        }
        if self.max_backsourcers == 0 {
            return Err("tracker.max_backsourcers must be at least 1".into());
        }
        // Peers that have a blob complete announce it every COMPLETE_ANNOUNCE_FACTOR intervals;
        // they must not expire in between.
        let min_ttl = (COMPLETE_ANNOUNCE_FACTOR as u64 + 1) * self.announce_interval_ms;
        if self.announce_interval_ms == 0 || self.peer_ttl_ms < min_ttl {
            return Err(format!(
                "tracker.peer_ttl_ms must be at least {} x tracker.announce_interval_ms",
                COMPLETE_ANNOUNCE_FACTOR + 1
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Metrics {
    announces: Counter,
    publishes: Counter,
    reports: Counter,
    peers: Gauge,
    blobs: Gauge,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    metrics: Metrics,
    registry: Registry,
}

type Ctx = AxumState<Arc<Shared>>;

/// Serves the tracker on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    cfg: TrackerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let metrics = Metrics::default();
    let mut registry = Registry::with_prefix("shoal_tracker");
    registry.register("announces", "Announces received", metrics.announces.clone());
    registry.register(
        "publishes",
        "Piece hash publications accepted",
        metrics.publishes.clone(),
    );
    registry.register(
        "reports",
        "Verification failures reported by peers",
        metrics.reports.clone(),
    );
    registry.register("peers", "Live peers", metrics.peers.clone());
    registry.register("blobs", "Blobs with live peers", metrics.blobs.clone());
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new(cfg)),
        metrics,
        registry,
    });
    let app = Router::new()
        .route("/announce", post(announce))
        .route("/metainfo/{digest}", get(metainfo))
        .route("/metainfo/{digest}/pieces", post(publish))
        .route("/report", post(report))
        .route("/metrics", get(metrics_text))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

async fn announce(AxumState(s): Ctx, Json(req): Json<AnnounceRequest>) -> Json<AnnounceResponse> {
    s.metrics.announces.inc();
    let mut st = lock(&s);
    let resp = st.announce(req, Instant::now());
    s.metrics.peers.set(st.peer_count() as i64);
    s.metrics.blobs.set(st.blob_count() as i64);
    Json(resp)
}

fn parse_digest(raw: &str) -> Result<Digest, (StatusCode, String)> {
    raw.parse()
        .map_err(|e: crate::digest::DigestError| (StatusCode::BAD_REQUEST, e.to_string()))
}

async fn metainfo(AxumState(s): Ctx, Path(digest): Path<String>) -> Response {
    let digest = match parse_digest(&digest) {
        Ok(d) => d,
        Err(bad) => return bad.into_response(),
    };
    match lock(&s).metainfo(&digest) {
        Some(meta) => Json(meta).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no metainfo for {digest}")).into_response(),
    }
}

async fn publish(
    AxumState(s): Ctx,
    Path(digest): Path<String>,
    Json(req): Json<PublishRequest>,
) -> Response {
    let digest = match parse_digest(&digest) {
        Ok(d) => d,
        Err(bad) => return bad.into_response(),
    };
    let result = lock(&s).publish(digest, req, Instant::now());
    match result {
        Ok(_) => {
            s.metrics.publishes.inc();
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e @ PublishError::NoLease { .. }) => {
            (StatusCode::FORBIDDEN, e.to_string()).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, e.to_string()).into_response(),
    }
}

async fn report(AxumState(s): Ctx, Json(req): Json<ReportRequest>) -> StatusCode {
    s.metrics.reports.inc();
    lock(&s).report(req);
    StatusCode::NO_CONTENT
}

async fn metrics_text(AxumState(s): Ctx) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => ([("content-type", "text/plain; version=0.0.4")], out).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
