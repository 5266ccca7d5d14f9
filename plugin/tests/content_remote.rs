//! `remote_content = true` on loopback: a tracker, a registry, a peer that pulled a blob from it,
//! and a node that knows no registry and whose content store has never seen the blob. containerd's `Info` on the node answers from the swarm (so
//! containerd skips the registry), and `Read` pulls the pieces it needs on demand.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use containerd_client::services::v1::{self as api, content_client::ContentClient};
use containerd_client::with_namespace;
use shoal_p2p::Digest;
use shoal_p2p::store::{BlobStore, StoreConfig};
use shoal_p2p::swarm::{P2pConfig, Swarm, SwarmMetrics};
use shoal_p2p::tracker::{self, TrackerConfig};
use shoal_p2p::upstream::{BlobSource, RegistryConfig, Upstream};
use shoal_plugin::content::{ContentConfig, ContentStore, service};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

#[path = "common/mod.rs"]
mod common;

use common::{blob, serve};

/// A registry serving one blob at `/v2/test/blob/blobs/<digest>`, with range requests.
async fn registry(blob: Vec<u8>) -> anyhow::Result<String> {
    let blob = Arc::new(blob);
    let serve = move |headers: HeaderMap| {
        let blob = blob.clone();
        async move {
            let size = blob.len();
            let range = headers
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok()?.strip_prefix("bytes=")?.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
            let mut h = HeaderMap::new();
            h.insert(
                "docker-content-digest",
                Digest::of(&blob).to_string().parse().expect("header"),
            );
            match range {
                Some((a, b)) if a <= b && b < size => {
                    let range = format!("bytes {a}-{b}/{size}").parse().expect("header");
                    h.insert(header::CONTENT_RANGE, range);
                    (StatusCode::PARTIAL_CONTENT, h, blob[a..=b].to_vec())
                }
                _ => {
                    h.insert(header::CONTENT_LENGTH, size.into());
                    (StatusCode::OK, h, Vec::new())
                }
            }
        }
    };
    let app = Router::new().route(
        "/v2/test/blob/blobs/{digest}",
        get(serve.clone()).head(serve),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// A swarm peer on loopback over the blob store at `root`, allowed to use `registries`.
async fn peer(
    root: &Path,
    tracker: &str,
    registries: &[&str],
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Swarm>> {
    let store = BlobStore::open(&StoreConfig {
        root: root.to_owned(),
        capacity: 1 << 30,
    })?;
    let cfg = P2pConfig {
        tracker: Some(tracker.to_owned()),
        ..P2pConfig::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let swarm = Swarm::new(
        cfg,
        listener.local_addr()?,
        store,
        Upstream::new(&RegistryConfig {
            insecure: registries.iter().map(|r| (*r).to_owned()).collect(),
            ..RegistryConfig::default()
        })?,
        SwarmMetrics::default(),
        shutdown.clone(),
    )?;
    tokio::spawn(swarm.clone().run(listener));
    Ok(swarm)
}

async fn info(client: &ContentClient<Channel>, digest: &str) -> Result<api::Info, Status> {
    let req = api::InfoRequest {
        digest: digest.to_owned(),
    };
    let info = client.clone().info(with_namespace!(req, "default")).await?;
    Ok(info.into_inner().info.unwrap_or_default())
}

async fn read(
    client: &ContentClient<Channel>,
    digest: &str,
    offset: i64,
    size: i64,
) -> Result<Vec<u8>, Status> {
    let req = api::ReadContentRequest {
        digest: digest.to_owned(),
        offset,
        size,
    };
    let mut stream = client.clone().read(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

#[tokio::test]
async fn info_and_read_answer_from_the_swarm() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    let tracker_listener = TcpListener::bind("127.0.0.1:0").await?;
    let tracker = format!("http://{}", tracker_listener.local_addr()?);
    tokio::spawn(tracker::run(
        tracker_listener,
        TrackerConfig::default(),
        shutdown.clone(),
    ));

    // The other node pulled the blob from the registry (publishing its piece hashes to the
    // tracker as it went) and seeds it.
    let data = blob((9 << 20) + 4321, 1);
    let digest = Digest::of(&data);
    let registry = registry(data.clone()).await?;
    let other = peer(&dir.path().join("other"), &tracker, &[&registry], &shutdown).await?;
    let pulled = other
        .fetch(digest, Some(BlobSource::new(registry, "test/blob")))
        .await?;
    tokio::time::timeout(Duration::from_secs(60), pulled.wait_range(0..pulled.size())).await??;
    drop(pulled);

    // This node knows no registry: whatever it gets comes from the swarm.
    let swarm = peer(&dir.path().join("node"), &tracker, &[], &shutdown).await?;
    let config = ContentConfig {
        remote_content: true,
        info_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(30),
    };
    let store = swarm.store().clone();
    let content = ContentStore::open(
        store,
        &dir.path().join("content.redb"),
        Some(swarm.clone()),
        config,
    )?;
    let (served, channel) = serve(
        &dir.path().join("shoal.sock"),
        Routes::new(service(content)),
    )
    .await?;
    let client = ContentClient::new(channel);

    // The other node's announce may not have reached the tracker yet: ask until it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        match info(&client, &digest.to_string()).await {
            Err(s) if s.code() == Code::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other?,
        }
    };
    assert_eq!(
        found.size,
        data.len() as i64,
        "Info answers with the swarm's size"
    );

    let start = 5 << 20;
    let middle = read(&client, &digest.to_string(), start, 100_000).await?;
    assert_eq!(middle, &data[start as usize..start as usize + 100_000]);
    assert_eq!(read(&client, &digest.to_string(), 0, 0).await?, data);

    // The count is updated just after the last piece becomes readable.
    let deadline = Instant::now() + Duration::from_secs(5);
    while swarm.metrics().bytes_from_peers.get() < data.len() as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let from_peers = swarm.metrics().bytes_from_peers.get();
    assert!(
        from_peers >= data.len() as u64,
        "only {from_peers} bytes came from peers"
    );

    let unknown = Digest::of(b"nobody has this").to_string();
    let started = Instant::now();
    let missing = info(&client, &unknown).await;
    assert_eq!(
        missing.map(drop).err().map(|s| s.code()),
        Some(Code::NotFound)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "Info waits a bounded time"
    );
    drop(client);
    served.stop().await
}
