//! The `shoal status` side: fetch a node's `/status` (twice, for a throughput) and print it.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{ByteCounters, NodeStatus};

/// How long one `/status` request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "could not reach the node at {url}: is `shoal node` running, and is mirror.listen in its config (or --node) this address?"
    )]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the node at {url} answered {status}: is this a Shoal node's mirror address?")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("reading the status the node at {url} sent")]
    Decode {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// A node's status with the throughput measured over two samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    #[serde(flatten)]
    pub status: NodeStatus,
    pub throughput: Throughput,
    /// containerd's images and what the node holds of them; `None` when containerd could not
    /// be asked (see `images_error`).
    #[serde(default)]
    pub images: Option<Vec<super::images::ImageStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_error: Option<String>,
}

/// Bytes per second between the two samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub interval_ms: u64,
    pub from_peers_bps: f64,
    pub from_upstream_bps: f64,
    pub to_peers_bps: f64,
}

impl Throughput {
    fn between(a: &ByteCounters, b: &ByteCounters, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
        Self {
            interval_ms: elapsed.as_millis().try_into().unwrap_or(u64::MAX),
            from_peers_bps: rate(a.from_peers, b.from_peers),
            from_upstream_bps: rate(a.from_upstream, b.from_upstream),
            to_peers_bps: rate(a.to_peers, b.to_peers),
        }
    }
}

/// `GET <node>/status`, where `node` is the mirror's base URL (`http://127.0.0.1:7072`).
pub async fn fetch(client: &reqwest::Client, node: &str) -> Result<NodeStatus, StatusError> {
    let url = format!("{}/status", node.trim_end_matches('/'));
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|source| StatusError::Unreachable {
            url: url.clone(),
            source,
        })?;
    if !resp.status().is_success() {
        return Err(StatusError::Status {
            status: resp.status(),
            url,
        });
    }
    resp.json()
        .await
        .map_err(|source| StatusError::Decode { url, source })
}

/// Fetches the status twice, `interval` apart, and reports the second with the throughput
/// between them.
pub async fn sample(node: &str, interval: Duration) -> Result<Report, StatusError> {
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .map_err(|source| StatusError::Unreachable {
            url: node.to_owned(),
            source,
        })?;
    let first = fetch(&client, node).await?;
    let started = Instant::now();
    tokio::time::sleep(interval).await;
    let status = fetch(&client, node).await?;
    let throughput = Throughput::between(&first.bytes, &status.bytes, started.elapsed());
    Ok(Report {
        status,
        throughput,
        images: None,
        images_error: None,
    })
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / f64::from(1 << 20))
}

/// The readable summary `shoal status` prints.
pub fn render(report: &Report) -> String {
    let s = &report.status;
    let t = &report.throughput;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} (blob store {}, {})",
        s.role,
        s.peer_id,
        s.store_root.display(),
        mib(s.store_bytes as f64)
    );
    let _ = writeln!(out, "peers connected: {}", s.peers_connected);
    for p in &s.peers {
        let _ = writeln!(out, "  {} at {} ({} blobs)", p.peer_id, p.addr, p.blobs);
    }
    let _ = writeln!(
        out,
        "throughput over {:.1} s: {}/s from peers, {}/s from the registry, {}/s to peers",
        t.interval_ms as f64 / 1000.0,
        mib(t.from_peers_bps),
        mib(t.from_upstream_bps),
        mib(t.to_peers_bps)
    );
    let _ = writeln!(
        out,
        "since start: {} from peers, {} from the registry, {} to peers",
        mib(s.bytes.from_peers as f64),
        mib(s.bytes.from_upstream as f64),
        mib(s.bytes.to_peers as f64)
    );
    let _ = writeln!(out, "blobs: {}", s.blobs.len());
    for b in &s.blobs {
        let _ = writeln!(
            out,
            "  {}  {:>10}  {:<8}  {}/{} pieces",
            b.digest,
            mib(b.size as f64),
            if b.complete { "complete" } else { "partial" },
            b.pieces_present,
            b.pieces_total
        );
    }
    match &s.lazy_mounts {
        None => {}
        Some(mounts) => {
            let _ = writeln!(out, "lazy mounts: {}", mounts.len());
            for m in mounts {
                let _ = writeln!(
                    out,
                    "  {}  layer {}  at {}",
                    m.snapshot,
                    m.layer,
                    m.dir.display()
                );
            }
        }
    }
    match (&report.images, &report.images_error) {
        (Some(images), _) => {
            let _ = writeln!(out, "images (from containerd): {}", images.len());
            for i in images {
                let _ = writeln!(
                    out,
                    "  {}/{}  {} layers: {} complete here, {} lazy",
                    i.namespace, i.name, i.layers, i.layers_complete, i.layers_lazy
                );
            }
        }
        (None, Some(why)) => {
            let _ = writeln!(out, "images: unknown ({why})");
        }
        (None, None) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BlobStatus, LazyMount};

    fn status(from_peers: u64) -> NodeStatus {
        NodeStatus {
            role: "node".into(),
            peer_id: "0011".into(),
            store_root: "/var/lib/shoal/store".into(),
            store_bytes: 3 << 20,
            blobs: vec![BlobStatus {
                digest: format!("sha256:{}", "a".repeat(64)),
                size: 3 << 20,
                piece_size: 1 << 20,
                pieces_present: 1,
                pieces_total: 3,
                complete: false,
            }],
            lazy_mounts: Some(vec![LazyMount {
                snapshot: "default/3/sha256:x".into(),
                layer: format!("sha256:{}", "b".repeat(64)),
                dir: "/var/lib/shoal/snapshotter/snapshots/3/fs".into(),
            }]),
            peers_connected: 2,
            peers: vec![shoal_p2p::swarm::PeerLink {
                peer_id: "77".into(),
                addr: "10.0.0.2:7071".into(),
                blobs: 2,
            }],
            bytes: ByteCounters {
                from_peers,
                from_upstream: 0,
                to_peers: 0,
            },
        }
    }

    #[test]
    fn the_summary_shows_blobs_mounts_and_rates() {
        let report = Report {
            throughput: Throughput::between(
                &status(0).bytes,
                &status(2 << 20).bytes,
                Duration::from_secs(1),
            ),
            status: status(2 << 20),
            images: Some(vec![super::super::images::ImageStatus {
                namespace: "default".into(),
                name: "registry.example/app:v1".into(),
                target: format!("sha256:{}", "c".repeat(64)),
                layers: 2,
                layers_complete: 1,
                layers_lazy: 1,
            }]),
            images_error: None,
        };
        let text = render(&report);
        for want in [
            "peers connected: 2",
            "77 at 10.0.0.2:7071 (2 blobs)",
            "2.0 MiB/s from peers",
            "partial   1/3 pieces",
            "layer sha256:bbbb",
            "default/registry.example/app:v1  2 layers: 1 complete here, 1 lazy",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_node_names_the_url() -> anyhow::Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let node = format!("http://127.0.0.1:{port}");
        let err = sample(&node, Duration::ZERO)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(&format!("{node}/status")) && err.contains("shoal node"),
            "{err}"
        );
        Ok(())
    }
}
