//! An in-process swarm on loopback: a tracker, an upstream registry that counts what it serves,
//! optionally a seed, and several nodes fetching the same blob at once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::{init_logs, random_blob, served, start_peer, start_registry};
use shoal_p2p::Digest;
use shoal_p2p::swarm::{P2pConfig, Swarm};
use shoal_p2p::tracker::{self, TrackerConfig};
use shoal_p2p::upstream::BlobSource;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn run_swarm(nodes: usize, with_seed: bool, corrupt_node: bool) -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    let blob = random_blob((24 << 20) + 12345);
    let digest = Digest::of(&blob);
    let (registry, reg) = start_registry(blob.clone()).await?;
    let tracker_listener = TcpListener::bind("127.0.0.1:0").await?;
    let tracker = format!("http://{}", tracker_listener.local_addr()?);
    tokio::spawn(tracker::run(
        tracker_listener,
        TrackerConfig::default(),
        shutdown.clone(),
    ));
    let cfg = P2pConfig {
        tracker: Some(tracker),
        ..P2pConfig::default()
    };
    if with_seed {
        start_peer(
            dir.path(),
            "seed",
            &registry,
            P2pConfig {
                seed: true,
                ..cfg.clone()
            },
            &shutdown,
        )
        .await?;
    }
    let mut peers = Vec::new();
    for i in 0..nodes {
        let corrupt_uploads = corrupt_node && i == 0;
        let cfg = P2pConfig {
            corrupt_uploads,
            ..cfg.clone()
        };
        peers.push(start_peer(dir.path(), &format!("node{i}"), &registry, cfg, &shutdown).await?);
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
        fetch_all(&peers[0]).await?;
    }
    let fetches = peers.iter().map(fetch_all);
    let blobs = futures::future::try_join_all(fetches)
        .await
        .context("fetching through the swarm")?;
    for blob in &blobs {
        let mut buf = vec![0u8; blob.size() as usize];
        blob.read_at(0, &mut buf)?;
        assert_eq!(Digest::of(&buf), digest, "a node holds wrong bytes");
    }
    let served = served(&reg);
    assert!(
        served < blob.len() as u64 * 11 / 10,
        "upstream served {served} bytes for a {} byte blob",
        blob.len()
    );
    let from_peers: u64 = peers
        .iter()
        .map(|s| s.metrics().bytes_from_peers.get())
        .sum();
    let expected = if with_seed { nodes } else { nodes - 1 } as u64 * blob.len() as u64;
    assert!(
        from_peers >= expected * 9 / 10,
        "only {from_peers} of {expected} bytes came from peers"
    );
    if corrupt_node {
        let caught: u64 = peers
            .iter()
            .map(|s| s.metrics().verification_failures.get())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_that_arrived_by_another_door_is_served_verified() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    let data = random_blob((6 << 20) + 3);
    let digest = Digest::of(&data);
    let tracker_listener = TcpListener::bind("127.0.0.1:0").await?;
    let tracker = format!("http://{}", tracker_listener.local_addr()?);
    tokio::spawn(tracker::run(
        tracker_listener,
        TrackerConfig::default(),
        shutdown.clone(),
    ));
    let cfg = P2pConfig {
        tracker: Some(tracker),
        ..P2pConfig::default()
    };
    // No registry anywhere: the blob exists only in the first node, put there as containerd's
    // content store would.
    let first = start_peer(dir.path(), "first", "127.0.0.1:9", cfg.clone(), &shutdown).await?;
    let ingest = first.store().ingest_dir().join("upload");
    std::fs::write(&ingest, &data)?;
    first.store().adopt(&ingest, Some(digest))?;
    first.seed(digest);
    let second = start_peer(dir.path(), "second", "127.0.0.1:9", cfg, &shutdown).await?;
    let blob = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            // The first node's announce may not have reached the tracker yet.
            match second.fetch(digest, None).await {
                Ok(blob) => return anyhow::Ok(blob),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await??;
    tokio::time::timeout(Duration::from_secs(20), blob.wait_range(0..blob.size())).await??;
    let mut buf = vec![0u8; blob.size() as usize];
    blob.read_at(0, &mut buf)?;
    assert_eq!(Digest::of(&buf), digest);
    // The count is updated just after the bytes become readable.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while second.metrics().bytes_from_peers.get() != data.len() as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every byte came from the peer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
