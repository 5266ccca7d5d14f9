//! The client against real HTTP servers started in-process on 127.0.0.1:0, one small axum router
//! per behaviour: ranged blobs, flaky 503s, 404s and a server that ignores `Range` (`blobs.rs`),
//! token and basic auth (`auth.rs`), manifests (`manifests.rs`), uploads and whole-blob downloads
//! (`push.rs`). This file has the shared server.

mod auth;
mod blobs;
mod manifests;
mod push;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::Query;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use bytes::Bytes;

use super::*;

const REPO: &str = "test/blob";
const BLOB_ROUTE: &str = "/v2/test/blob/blobs/{digest}";
const DIGEST_HEADER: HeaderName = HeaderName::from_static("docker-content-digest");

/// An axum server on an ephemeral port, stopped when dropped.
struct TestServer {
    registry: String,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// `make` receives the server's base URL, for routers that link to themselves.
    async fn start(make: impl FnOnce(&str) -> Router) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let registry = listener.local_addr()?.to_string();
        let router = make(&format!("http://{registry}"));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("test server failed: {e}");
            }
        });
        Ok(Self { registry, task })
    }

    fn source(&self) -> BlobSource {
        BlobSource::new(&self.registry, REPO)
    }

    /// A client for this server with `docker_config` as its only credentials.
    fn client(&self, docker_config: &str, retries: u32) -> anyhow::Result<Upstream> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.json");
        std::fs::write(&path, docker_config)?;
        let cfg = RegistryConfig {
            docker_config: Some(path),
            insecure: vec![self.registry.clone()],
            retries,
            connect_timeout_ms: 2_000,
            request_timeout_ms: 10_000,
        };
        Ok(Upstream::new(&cfg)?)
    }

    fn login_config(&self, user: &str, password: &str) -> String {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            self.registry
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

fn hits(c: &AtomicUsize) -> usize {
    c.load(Ordering::SeqCst)
}

fn test_blob() -> (Bytes, Digest) {
    let data: Bytes = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let digest = Digest::of(&data);
    (data, digest)
}

/// Answers like distribution: `Range: bytes=a-b` gets a 206, no range the whole blob.
fn serve_blob(data: &Bytes, headers: &HeaderMap) -> Response {
    let total = data.len() as u64;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| {
            v.to_str()
                .ok()?
                .strip_prefix("bytes=")?
                .split_once('-')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
        })
        .map(|(a, b)| (a.parse::<u64>().ok(), b.parse::<u64>().ok()));
    let digest = Digest::of(data).to_string();
    match range {
        None => (
            [
                (header::CONTENT_LENGTH, total.to_string()),
                (DIGEST_HEADER, digest),
            ],
            data.clone(),
        )
            .into_response(),
        Some((Some(a), Some(b))) if a <= b && b < total => {
            let body = data.slice(a as usize..=b as usize);
            let content_range = format!("bytes {a}-{b}/{total}");
            (
                StatusCode::PARTIAL_CONTENT,
                [(header::CONTENT_RANGE, content_range)],
                body,
            )
                .into_response()
        }
        Some(_) => StatusCode::RANGE_NOT_SATISFIABLE.into_response(),
    }
}
