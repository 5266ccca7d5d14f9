//! Faults cost time, not correctness: a tracker that is down, a peer that dies mid-transfer.

mod common;

use std::time::Duration;

use common::{init_logs, random_blob, served, start_peer, start_peer_capped, start_registry};
use shoal_p2p::Digest;
use shoal_p2p::swarm::P2pConfig;
use shoal_p2p::tracker::{self, TrackerConfig};
use shoal_p2p::upstream::BlobSource;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn read_all(blob: &shoal_p2p::store::Blob) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(60), blob.wait_range(0..blob.size())).await??;
    let mut buf = vec![0u8; blob.size() as usize];
    blob.read_at(0, &mut buf)?;
    Ok(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_tracker_down_a_node_falls_back_to_upstream() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    let data = random_blob(5 << 20);
    let digest = Digest::of(&data);
    let (registry, reg) = start_registry(data.clone()).await?;
    // A port nobody listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let cfg = P2pConfig {
        tracker: Some(format!("http://{dead}")),
        ..P2pConfig::default()
    };
    let node = start_peer(dir.path(), "node", &registry, cfg, &shutdown).await?;
    let blob = node
        .fetch(digest, Some(BlobSource::new(registry, "test/blob")))
        .await?;
    assert_eq!(Digest::of(&read_all(&blob).await?), digest);
    assert_eq!(served(&reg), data.len() as u64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_dying_mid_transfer_costs_time_not_correctness() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    let data = random_blob(16 << 20);
    let digest = Digest::of(&data);
    let (registry, reg) = start_registry(data.clone()).await?;
    let tracker_listener = TcpListener::bind("127.0.0.1:0").await?;
    let tracker_cfg = TrackerConfig {
        announce_interval_ms: 100,
        peer_ttl_ms: 1000,
        ..TrackerConfig::default()
    };
    let tracker_url = format!("http://{}", tracker_listener.local_addr()?);
    tokio::spawn(tracker::run(
        tracker_listener,
        tracker_cfg,
        shutdown.clone(),
    ));
    let source = BlobSource::new(registry.clone(), "test/blob");

    // The first node gets the whole blob, then serves it slowly (32 Mbit/s: 4 s for 16 MiB).
    let first_down = CancellationToken::new();
    let slow = P2pConfig {
        tracker: Some(tracker_url.clone()),
        egress_mbit: 32,
        ..P2pConfig::default()
    };
    let first = start_peer(dir.path(), "first", &registry, slow, &first_down).await?;
    read_all(&first.fetch(digest, Some(source.clone())).await?).await?;
    // Once the tracker has every hash, nobody else is sent upstream for this blob.
    let tracker = shoal_p2p::tracker::TrackerClient::new(&tracker_url);
    while !tracker
        .metainfo(&digest)
        .await?
        .is_some_and(|m| m.is_complete())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let upstream_before = served(&reg);

    let cfg = P2pConfig {
        tracker: Some(tracker_url),
        ..P2pConfig::default()
    };
    let second = start_peer(dir.path(), "second", &registry, cfg, &shutdown).await?;
    let blob = second.fetch(digest, Some(source)).await?;
    // Once some pieces have come from the first node, it dies.
    let mut changes = blob.subscribe();
    while blob.have().count() < 2 {
        tokio::time::timeout(Duration::from_secs(20), changes.changed()).await??;
    }
    first_down.cancel();
    assert_eq!(
        Digest::of(&read_all(&blob).await?),
        digest,
        "wrong bytes after the peer died"
    );
    let got_from_first = second.metrics().bytes_from_peers.get();
    let refetched = served(&reg) - upstream_before;
    eprintln!(
        "from first {got_from_first}, refetched {refetched}, second's upstream {} wasted {}",
        second.metrics().bytes_from_upstream.get(),
        second.metrics().pieces_wasted.get()
    );
    assert!(
        got_from_first > 0 && got_from_first < data.len() as u64,
        "first node served {got_from_first} bytes"
    );
    assert_eq!(
        got_from_first + refetched,
        data.len() as u64,
        "the rest came from upstream, once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_blobs_are_still_evicted_under_the_store_cap() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    let (a, b) = (random_blob(5 << 20), random_blob((5 << 20) + 1));
    let (reg_a, _) = start_registry(a.clone()).await?;
    let (reg_b, _) = start_registry(b.clone()).await?;
    // No tracker: the node fetches upstream and seeds what it has.
    let node = start_peer_capped(
        dir.path(),
        "node",
        &[&reg_a, &reg_b],
        P2pConfig::default(),
        8 << 20,
        &shutdown,
    )
    .await?;
    let blob_a = node
        .fetch(Digest::of(&a), Some(BlobSource::new(reg_a, "test/blob")))
        .await?;
    read_all(&blob_a).await?;
    drop(blob_a);
    let blob_b = node
        .fetch(Digest::of(&b), Some(BlobSource::new(reg_b, "test/blob")))
        .await?;
    read_all(&blob_b).await?;
    // Bytes are readable as soon as every piece is verified; the blob completes (whole-digest
    // check) and the store evicts what no one uses right after.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !(blob_b.is_complete() && node.store().get(&Digest::of(&a)).is_none()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the seeded blob was kept over the cap"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
