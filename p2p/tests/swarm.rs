//! An in-process swarm on loopback: a tracker, an upstream registry that counts what it serves,
//! optionally a seed, and several nodes fetching the same blob at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use shoal_p2p::Digest;
use shoal_p2p::store::{BlobStore, StoreConfig};
use shoal_p2p::swarm::{P2pConfig, Swarm, SwarmMetrics};
use shoal_p2p::tracker::{self, TrackerConfig};
use shoal_p2p::upstream::{BlobSource, RegistryConfig, Upstream};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct FakeRegistry {
    blob: Vec<u8>,
    served: AtomicU64,
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

async fn start_registry(blob: Vec<u8>) -> anyhow::Result<(String, Arc<FakeRegistry>)> {
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

async fn start_peer(
    dir: &std::path::Path,
    name: &str,
    tracker: &str,
    registry: &str,
    seed: bool,
    corrupt: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Swarm>> {
    let store = BlobStore::open(&StoreConfig {
        root: dir.join(name),
        capacity: u64::MAX,
    })?;
    let upstream = Upstream::new(&RegistryConfig {
        insecure: vec![registry.to_owned()],
        ..RegistryConfig::default()
    })?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let cfg = P2pConfig {
        tracker: Some(format!("http://{tracker}")),
        seed,
        corrupt_uploads: corrupt,
        ..P2pConfig::default()
    };
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

fn random_blob(len: usize) -> Vec<u8> {
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

async fn run_swarm(nodes: usize, with_seed: bool, corrupt_node: bool) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    let blob = random_blob((24 << 20) + 12345);
    let digest = Digest::of(&blob);
    let (registry, reg) = start_registry(blob.clone()).await?;
    let tracker_listener = TcpListener::bind("127.0.0.1:0").await?;
    let tracker = tracker_listener.local_addr()?.to_string();
    tokio::spawn(tracker::run(
        tracker_listener,
        TrackerConfig::default(),
        shutdown.clone(),
    ));
    if with_seed {
        start_peer(
            dir.path(),
            "seed",
            &tracker,
            &registry,
            true,
            false,
            &shutdown,
        )
        .await?;
    }
    let mut peers = Vec::new();
    for i in 0..nodes {
        let corrupt = corrupt_node && i == 0;
        peers.push((
            corrupt,
            start_peer(
                dir.path(),
                &format!("node{i}"),
                &tracker,
                &registry,
                false,
                corrupt,
                &shutdown,
            )
            .await?,
        ));
    }
    if with_seed {
        // Let the seed's heartbeat reach the tracker, so nodes are sent to it.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let source = BlobSource::new(registry.clone(), "test/blob");
    let fetch_all = |swarm: &Arc<Swarm>| {
        let (swarm, source) = (swarm.clone(), source.clone());
        async move {
            let blob = swarm.fetch(digest, Some(source)).await?;
            tokio::time::timeout(Duration::from_secs(60), blob.wait_range(0..blob.size()))
                .await??;
            anyhow::Ok(blob)
        }
    };
    if corrupt_node {
        // The corrupt node has the whole blob before anyone else asks: everyone will try it.
        fetch_all(&peers[0].1).await?;
    }
    let fetches = peers.iter().map(|(_, swarm)| fetch_all(swarm));
    let blobs = futures::future::try_join_all(fetches)
        .await
        .context("fetching through the swarm")?;
    for blob in &blobs {
        let mut buf = vec![0u8; blob.size() as usize];
        blob.read_at(0, &mut buf)?;
        assert_eq!(Digest::of(&buf), digest, "a node holds wrong bytes");
    }
    let served = reg.served.load(Ordering::Relaxed);
    assert!(
        served < blob.len() as u64 * 11 / 10,
        "upstream served {served} bytes for a {} byte blob",
        blob.len()
    );
    let from_peers: u64 = peers
        .iter()
        .map(|(_, s)| s.metrics().bytes_from_peers.get())
        .sum();
    let expected = if with_seed { nodes } else { nodes - 1 } as u64 * blob.len() as u64;
    assert!(
        from_peers >= expected * 9 / 10,
        "only {from_peers} of {expected} bytes came from peers"
    );
    if corrupt_node {
        let caught: u64 = peers
            .iter()
            .map(|(_, s)| s.metrics().verification_failures.get())
            .sum();
        assert!(caught > 0, "nobody caught the corrupt peer");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_share_a_blob_fetched_upstream_about_once() -> anyhow::Result<()> {
    run_swarm(4, false, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seed_back_sources_for_the_nodes() -> anyhow::Result<()> {
    run_swarm(4, true, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_serving_corrupt_pieces_is_caught() -> anyhow::Result<()> {
    run_swarm(4, true, true).await
}
