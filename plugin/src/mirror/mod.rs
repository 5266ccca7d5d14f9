//! The registry mirror containerd pulls through (`hosts.toml`): manifests are proxied to the
//! upstream registry, blobs are streamed out of the swarm as verified pieces arrive.
//!
//! containerd asks `GET /v2/<repo>/blobs/<digest>?ns=<registry>` (optionally with
//! `Range: bytes=N-`); `ns` and `repo` tell the swarm where the blob lives upstream. When the
//! swarm cannot serve a blob (nobody knows its size in time), the answer is a fast 404, which
//! makes containerd fall back to the next host in `hosts.toml`. No byte leaves this server
//! before its piece has been checked against its hash.

mod manifest;
mod range;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use shoal_p2p::Digest;
use shoal_p2p::store::Blob;
use shoal_p2p::swarm::Swarm;
use shoal_p2p::upstream::{BlobSource, Upstream};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::MirrorConfig;
use crate::lazy::Lazy;

/// What the mirror serves from.
#[derive(Debug)]
pub struct Mirror {
    pub swarm: Arc<Swarm>,
    pub upstream: Upstream,
    pub registry: Registry,
    pub cfg: MirrorConfig,
    /// The node's lazy layers, for `/status`; `None` on a seed.
    pub lazy: Option<Arc<Lazy>>,
}

/// Serves the mirror (and `/metrics`, `/status`) on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    mirror: Mirror,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v2/", get(ping))
        .route("/v2/{*rest}", get(dispatch).head(dispatch))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(Arc::new(mirror));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn ping() -> &'static str {
    "{}"
}

async fn metrics(State(m): State<Arc<Mirror>>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &m.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// What this node holds and does, for `shoal status`.
async fn status(State(m): State<Arc<Mirror>>) -> Json<crate::status::NodeStatus> {
    Json(crate::status::collect(&m.swarm, m.lazy.as_deref()))
}

#[derive(Debug, Deserialize)]
struct NsQuery {
    ns: Option<String>,
}

fn not_found(why: impl std::fmt::Display) -> Response {
    debug!(%why, "mirror answers 404");
    (StatusCode::NOT_FOUND, why.to_string()).into_response()
}

async fn dispatch(
    State(m): State<Arc<Mirror>>,
    method: Method,
    Path(rest): Path<String>,
    Query(q): Query<NsQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(ns) = q.ns else {
        return not_found("no ?ns= parameter: this mirror serves containerd hosts.toml requests");
    };
    let head = method == Method::HEAD;
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        return manifest::serve(&m, BlobSource::new(ns, repo), reference, &headers, head).await;
    }
    if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
        let source = BlobSource::new(ns, repo);
        if let Err(e) = source.validate() {
            return (StatusCode::BAD_REQUEST, e.to_string()).into_response();
        }
        let digest: Digest = match digest.parse() {
            Ok(d) => d,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        };
        return blob(&m, source, digest, &headers, head).await;
    }
    not_found(format!("no such endpoint /v2/{rest}"))
}

async fn blob(
    m: &Mirror,
    source: BlobSource,
    digest: Digest,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let blob = match m.swarm.fetch(digest, Some(source)).await {
        Ok(b) => b,
        Err(e) => return not_found(e),
    };
    let size = blob.size();
    let range = match range::parse(headers.get(header::RANGE), size) {
        Ok(r) => r,
        Err(()) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response();
        }
    };
    let (status, span) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r),
        None => (StatusCode::OK, 0..size),
    };
    let mut resp = if head {
        Response::new(Body::empty())
    } else {
        let stall = Duration::from_millis(m.cfg.stall_timeout_ms);
        Response::new(Body::from_stream(stream_blob(
            m.swarm.clone(),
            blob,
            span.clone(),
            stall,
        )))
    };
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(span.end - span.start),
    );
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("docker-content-digest", v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!(
            "bytes {}-{}/{size}",
            span.start,
            span.end.saturating_sub(1)
        ))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

/// Streams `span` of the blob piece by piece, each one only once it is verified and stored.
fn stream_blob(
    swarm: Arc<Swarm>,
    blob: Blob,
    span: std::ops::Range<u64>,
    stall: Duration,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    let piece = u64::from(blob.layout().piece_size);
    futures::stream::try_unfold(span.start, move |pos| {
        let (swarm, blob) = (swarm.clone(), blob.clone());
        async move {
            if pos >= span.end {
                return Ok(None);
            }
            let end = ((pos / piece + 1) * piece).min(span.end);
            // Ask for a few pieces ahead so the swarm fetches what we will read next first.
            swarm.want(&blob.digest(), pos..(end + 4 * piece).min(span.end));
            match tokio::time::timeout(stall, blob.wait_range(pos..end)).await {
                Err(_) => {
                    return Err(io_err(format!(
                        "no progress on {} for {stall:?}",
                        blob.digest()
                    )));
                }
                Ok(Err(e)) => return Err(io_err(e.to_string())),
                Ok(Ok(())) => {}
            }
            let reader = blob.clone();
            let data = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; (end - pos) as usize];
                reader.read_at(pos, &mut buf).map(|()| buf)
            })
            .await
            .map_err(|e| io_err(e.to_string()))?
            .map_err(|e| io_err(e.to_string()))?;
            Ok(Some((Bytes::from(data), end)))
        }
    })
}

fn io_err(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}
