//! Manifests for containerd: proxied to the upstream registry, and, for a manifest asked for by
//! digest, served out of the swarm when the registry cannot answer, so pulls by digest keep
//! working while the registry is down. A manifest from the swarm is checked against its digest
//! like any blob.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use shoal_p2p::Digest;
use shoal_p2p::upstream::{BlobSource, ManifestResponse};
use tracing::{debug, warn};

use super::{Mirror, not_found};

/// Registries refuse manifests above 4 MiB; so do we.
const MAX_MANIFEST: u64 = 4 << 20;

pub(super) async fn serve(
    m: &Mirror,
    source: BlobSource,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let accept: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let err = match m.upstream.manifest(&source, reference, &accept, head).await {
        Ok(resp) => return relay(resp),
        Err(e) => e,
    };
    if let Ok(digest) = reference.parse::<Digest>() {
        match from_swarm(m, source.clone(), digest, head).await {
            Some(resp) => return resp,
            None => debug!(%digest, "manifest not in the swarm either"),
        }
    }
    if !err.is_not_found() {
        warn!(%source, reference, error = %err, "proxying manifest");
    }
    // containerd tries the next host on a 404; on a 5xx it would give up.
    not_found(err)
}

fn relay(resp: ManifestResponse) -> Response {
    let mut out = Response::new(Body::from(resp.body));
    *out.status_mut() = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    set_headers(
        out.headers_mut(),
        resp.content_type,
        resp.docker_content_digest,
        resp.content_length,
    );
    out
}

fn set_headers(h: &mut HeaderMap, kind: Option<String>, digest: Option<String>, len: Option<u64>) {
    for (name, value) in [
        (header::CONTENT_TYPE, kind),
        (
            header::HeaderName::from_static("docker-content-digest"),
            digest,
        ),
        (header::CONTENT_LENGTH, len.map(|l| l.to_string())),
    ] {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(name, v);
        }
    }
}

/// Only the field that tells containerd how to parse the document.
#[derive(Deserialize)]
struct MediaType {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
}

async fn from_swarm(
    m: &Mirror,
    source: BlobSource,
    digest: Digest,
    head: bool,
) -> Option<Response> {
    let blob = m.swarm.fetch(digest, Some(source)).await.ok()?;
    let size = blob.size();
    if size > MAX_MANIFEST {
        return None;
    }
    let stall = Duration::from_millis(m.cfg.stall_timeout_ms);
    m.swarm.want(&digest, 0..size);
    tokio::time::timeout(stall, blob.wait_range(0..size))
        .await
        .ok()?
        .ok()?;
    let body = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; size as usize];
        blob.read_at(0, &mut buf).map(|()| buf)
    })
    .await
    .ok()?
    .ok()?;
    // Without a media type containerd cannot tell a manifest from an index: not ours to guess.
    let media_type = serde_json::from_slice::<MediaType>(&body)
        .ok()?
        .media_type?;
    let mut out = Response::new(if head {
        Body::empty()
    } else {
        Body::from(body)
    });
    set_headers(
        out.headers_mut(),
        Some(media_type),
        Some(digest.to_string()),
        Some(size),
    );
    Some(out)
}
