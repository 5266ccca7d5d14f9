//! Shared pieces of the in-process swarm tests: an upstream registry that counts what it serves,
//! and peers on loopback.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use shoal_p2p::Digest;
use shoal_p2p::store::{BlobStore, StoreConfig};
use shoal_p2p::swarm::{P2pConfig, Swarm, SwarmMetrics};
use shoal_p2p::upstream::{RegistryConfig, Upstream};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct FakeRegistry {
    pub blob: Vec<u8>,
    pub served: AtomicU64,
}

async fn serve_blob(State(reg): State<Arc<FakeRegistry>>, headers: HeaderMap) -> impl IntoResponse {
    let size = reg.blob.len() as u64;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    let mut h = HeaderMap::new();
    h.insert(
        "docker-content-digest",
        Digest::of(&reg.blob).to_string().parse().expect("header"),
    );
    match range {
        Some((a, b)) if a <= b && b < size => {
            let body = reg.blob[a as usize..=b as usize].to_vec();
            reg.served.fetch_add(body.len() as u64, Ordering::Relaxed);
            h.insert(
                header::CONTENT_RANGE,
                format!("bytes {a}-{b}/{size}").parse().expect("header"),
            );
            (StatusCode::PARTIAL_CONTENT, h, body)
        }
        _ => {
            h.insert(header::CONTENT_LENGTH, size.into());
            (StatusCode::OK, h, Vec::new())
        }
    }
}

pub async fn start_registry(blob: Vec<u8>) -> anyhow::Result<(String, Arc<FakeRegistry>)> {
    let reg = Arc::new(FakeRegistry {
        blob,
        served: AtomicU64::new(0),
    });
    let app = Router::new()
        .route(
            "/v2/test/blob/blobs/{digest}",
            get(serve_blob).head(serve_blob),
        )
        .with_state(reg.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, reg))
}

pub async fn start_peer(
    dir: &std::path::Path,
    name: &str,
    registry: &str,
    cfg: P2pConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Swarm>> {
    start_peer_capped(dir, name, &[registry], cfg, u64::MAX, shutdown).await
}

/// A peer whose blob store holds at most `capacity` bytes, talking to several registries.
pub async fn start_peer_capped(
    dir: &std::path::Path,
    name: &str,
    registries: &[&str],
    cfg: P2pConfig,
    capacity: u64,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Swarm>> {
    let store = BlobStore::open(&StoreConfig {
        root: dir.join(name),
        capacity,
    })?;
    let upstream = Upstream::new(&RegistryConfig {
        insecure: registries.iter().map(|r| r.to_string()).collect(),
        ..RegistryConfig::default()
    })?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let swarm = Swarm::new(
        cfg,
        listener.local_addr()?,
        store,
        upstream,
        SwarmMetrics::default(),
        shutdown.clone(),
    )?;
    tokio::spawn(swarm.clone().run(listener));
    Ok(swarm)
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn served(reg: &FakeRegistry) -> u64 {
    reg.served.load(Ordering::Relaxed)
}

pub fn random_blob(len: usize) -> Vec<u8> {
    let mut state = 0x9e3779b97f4a7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
