//! `shoal pull IMAGE`: a containerd pull that lets Shoal mount layers lazily.
//!
//! Plain `ctr image pull` (containerd 1.6) passes no labels to the snapshotter, so every layer is
//! downloaded and unpacked. `shoal pull` does what containerd's client pull does, as
//! `ctr-remote image rpull` does for stargz: it writes the manifest and config into the content
//! store, then unpacks layer by layer, calling `Prepare` with `containerd.io/snapshot.ref`, the
//! CRI's `cri.*` labels and the layer's `containerd.io/snapshot/*` annotations (the eStargz TOC
//! digest among them). Shoal's snapshotter answers `ALREADY_EXISTS` for the layers it mounts
//! lazily; the others are downloaded (through the node's mirror, so from the swarm) and applied
//! with containerd's diff service, exactly as containerd would. Last, the image record is made.
//!
//! Everything is written under a lease that expires by itself, and the garbage collector's
//! labels are set as containerd sets them (`gc.ref.content.*` on the manifest,
//! `gc.ref.snapshot.<snapshotter>` on the config), so `ctr image rm` cleans up after it.

mod containerd;
mod image;
mod progress;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use containerd_client::types::Descriptor;
use futures::{StreamExt, TryStreamExt};
use shoal_p2p::Digest;
use shoal_p2p::upstream::{BlobSource, Upstream};

pub use self::containerd::{Containerd, Prepared};
use self::image::{Image, chain_ids};
pub use self::progress::Progress;
use crate::reference::{Reference, ReferenceError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("connecting to containerd at {socket} (is containerd running? --address)")]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("containerd: {what}: {} ({:?})", status.message(), status.code())]
    Containerd {
        what: &'static str,
        status: tonic::Status,
    },
    #[error("registry")]
    Upstream(#[from] shoal_p2p::upstream::Error),
    #[error("node mirror {url}")]
    Mirror {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("temporary file")]
    Io(#[from] std::io::Error),
}

/// What `shoal pull` is asked to do.
#[derive(Clone, Debug)]
pub struct PullOptions {
    pub image: String,
    /// containerd's socket.
    pub address: PathBuf,
    pub namespace: String,
    /// The name of Shoal's proxy snapshotter in containerd's config.
    pub snapshotter: String,
    /// `linux/amd64`-style platform to pick from a multi-platform image.
    pub platform: String,
    /// The node's mirror and metrics endpoint (`http://127.0.0.1:7072`): layers that are not
    /// lazy are fetched through it, from the swarm; `None` fetches them from the registry.
    pub node: Option<String>,
}

/// How one layer ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Mounted lazily: its bytes arrive as containers read them.
    Lazy,
    /// Downloaded and unpacked.
    Unpacked,
    /// Already there from an earlier pull.
    Present,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerSummary {
    pub digest: String,
    pub size: u64,
    pub outcome: Outcome,
}

/// What a pull did, for the summary `shoal pull` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PullSummary {
    pub image: String,
    pub manifest: String,
    pub layers: Vec<LayerSummary>,
    /// Bytes the node fetched during the pull, from peers and from the registry (read from the
    /// node's metrics; `None` without `node`).
    pub from_peers: Option<u64>,
    pub from_upstream: Option<u64>,
}

impl PullSummary {
    /// Layer bytes that stay where they are until a container reads them.
    pub fn lazy_bytes(&self) -> u64 {
        self.layers
            .iter()
            .filter(|l| l.outcome == Outcome::Lazy)
            .map(|l| l.size)
            .sum()
    }
}

/// Pulls `opts.image` into containerd, lazily where the snapshotter can.
pub async fn pull(
    upstream: &Upstream,
    opts: &PullOptions,
    progress: &Progress,
) -> Result<PullSummary, Error> {
    let reference: Reference = opts.image.parse()?;
    let source = reference.source();
    let before = node_counters(opts.node.as_deref()).await;
    let image = Image::fetch(upstream, &reference, &opts.platform).await?;
    let diff_ids = image.diff_ids()?;
    let chains = chain_ids(&diff_ids);

    let mut containerd =
        Containerd::connect(&opts.address, &opts.namespace, &opts.snapshotter).await?;
    containerd.lease(Duration::from_secs(3600)).await?;

    // Everything under the lease, which is let go of whatever happens: a failed pull leaves
    // nothing pinned for the garbage collector.
    let recorded = async {
        let mut layers = Vec::new();
        let layer_list = image
            .layers
            .iter()
            .map(|l| l.digest.as_str())
            .collect::<Vec<_>>();
        for (i, layer) in image.layers.iter().enumerate() {
            let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
            let bar = progress.layer(&layer.digest, layer.size);
            let outcome = unpack_layer(
                &containerd,
                upstream,
                opts,
                &source,
                &reference,
                &image,
                i,
                &chains[i],
                parent,
                &diff_ids[i],
                &layer_list,
                &bar,
            )
            .await?;
            bar.finish(outcome);
            layers.push(LayerSummary {
                digest: layer.digest.clone(),
                size: layer.size,
                outcome,
            });
        }

        // Children before parents, each labelled for the garbage collector as containerd does.
        let distribution = (
            format!("containerd.io/distribution.source.{}", reference.registry),
            reference.repository.clone(),
        );
        let mut config_labels = HashMap::from([distribution.clone()]);
        if let Some(top) = chains.last() {
            config_labels.insert(
                format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
                top.clone(),
            );
        }
        put_blob(
            &containerd,
            &image.config_digest,
            &image.config,
            config_labels,
        )
        .await?;
        let mut manifest_labels = HashMap::from([
            distribution.clone(),
            (
                "containerd.io/gc.ref.content.config".to_owned(),
                image.config_digest.clone(),
            ),
        ]);
        for (i, layer) in image.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            );
        }
        put_blob(
            &containerd,
            &image.manifest_digest,
            &image.manifest,
            manifest_labels,
        )
        .await?;
        let target = match &image.index {
            Some(index) => {
                let labels = HashMap::from([
                    distribution,
                    (
                        "containerd.io/gc.ref.content.m.0".to_owned(),
                        image.manifest_digest.clone(),
                    ),
                ]);
                put_blob(&containerd, &index.digest, &index.body, labels).await?;
                descriptor(&index.media_type, &index.digest, index.body.len() as u64)
            }
            None => descriptor(
                &image.manifest_media_type,
                &image.manifest_digest,
                image.manifest.len() as u64,
            ),
        };
        containerd.set_image(&reference.to_string(), target).await?;
        Ok::<_, Error>(layers)
    }
    .await;
    let released = containerd.release().await;
    let layers = recorded?;
    released?;

    let after = node_counters(opts.node.as_deref()).await;
    let delta = |pick: fn(&(u64, u64)) -> u64| {
        before
            .zip(after)
            .map(|(b, a)| pick(&a).saturating_sub(pick(&b)))
    };
    Ok(PullSummary {
        image: reference.to_string(),
        manifest: image.manifest_digest.clone(),
        layers,
        from_peers: delta(|c| c.0),
        from_upstream: delta(|c| c.1),
    })
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest: digest.to_owned(),
        size: size as i64,
        annotations: HashMap::new(),
    }
}

/// Writes a small blob (config, manifest, index), or labels it if containerd has it already.
async fn put_blob(
    containerd: &Containerd,
    digest: &str,
    body: &Bytes,
    labels: HashMap<String, String>,
) -> Result<(), Error> {
    let body = body.clone();
    let size = body.len() as u64;
    containerd
        .write_content(
            digest,
            size,
            labels.clone(),
            futures::stream::once(async move { Ok(body) }),
        )
        .await?;
    // An existing blob keeps its labels through a write; add ours.
    containerd.label_content(digest, labels).await
}

/// Unpacks layer `i`: lazily when the snapshotter takes it, else downloaded and applied.
#[allow(clippy::too_many_arguments)]
async fn unpack_layer(
    containerd: &Containerd,
    upstream: &Upstream,
    opts: &PullOptions,
    source: &BlobSource,
    reference: &Reference,
    image: &Image,
    i: usize,
    chain: &str,
    parent: &str,
    diff_id: &str,
    layer_list: &[&str],
    bar: &progress::LayerBar,
) -> Result<Outcome, Error> {
    if containerd.stat_snapshot(chain).await? {
        return Ok(Outcome::Present);
    }
    let layer = &image.layers[i];
    let mut labels: HashMap<String, String> = layer
        .annotations
        .iter()
        .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend([
        (
            crate::snapshotter::SNAPSHOT_REF.to_owned(),
            chain.to_owned(),
        ),
        (crate::lazy::CRI_IMAGE_REF.to_owned(), reference.to_string()),
        (
            crate::lazy::CRI_LAYER_DIGEST.to_owned(),
            layer.digest.clone(),
        ),
        (
            "containerd.io/snapshot/cri.manifest-digest".to_owned(),
            image.manifest_digest.clone(),
        ),
        (
            "containerd.io/snapshot/cri.image-layers".to_owned(),
            image_layers_label(&layer_list[i..]),
        ),
    ]);
    let key = format!(
        "extract-{} {chain}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let mounts = match containerd.prepare(&key, parent, labels.clone()).await? {
        Prepared::Exists => return Ok(Outcome::Lazy),
        Prepared::Mounts(mounts) => mounts,
    };
    let unpacked = async {
        if !containerd.has_content(&layer.digest).await? {
            let data = download(upstream, opts, source, &layer.digest, bar).await?;
            containerd
                .write_content(&layer.digest, layer.size, HashMap::new(), data)
                .await?;
        }
        let applied = containerd
            .apply(
                descriptor(&layer.media_type, &layer.digest, layer.size),
                mounts,
            )
            .await?;
        if applied != diff_id {
            return Err(Error::Invalid(format!(
                "layer {} unpacks to {applied}, but the image config says {diff_id}",
                layer.digest
            )));
        }
        containerd.commit(chain, &key, labels).await
    };
    match unpacked.await {
        Ok(()) => Ok(Outcome::Unpacked),
        Err(e) => {
            let _ = containerd.remove_snapshot(&key).await;
            Err(e)
        }
    }
}

/// containerd's `cri.image-layers`: the layers from this one up, comma separated, cut to stay
/// under the 4 KiB label limit.
fn image_layers_label(layers: &[&str]) -> String {
    let mut out = String::new();
    for layer in layers {
        if out.len() + layer.len() + 1 > 4000 {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(layer);
    }
    out
}

type ByteStream = futures::stream::BoxStream<'static, Result<Bytes, Error>>;

/// A layer's bytes: through the node's mirror (the swarm), or straight from the registry.
async fn download(
    upstream: &Upstream,
    opts: &PullOptions,
    source: &BlobSource,
    digest: &str,
    bar: &progress::LayerBar,
) -> Result<ByteStream, Error> {
    let counted = {
        let bar = bar.clone();
        move |chunk: Result<Bytes, Error>| {
            if let Ok(bytes) = &chunk {
                bar.advance(bytes.len() as u64);
            }
            chunk
        }
    };
    if let Some(node) = &opts.node {
        let url = format!(
            "{node}/v2/{}/blobs/{digest}?ns={}",
            source.repository, source.registry
        );
        let response = http_client()?
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|source| Error::Mirror {
                url: url.clone(),
                source,
            })?;
        let stream = response
            .bytes_stream()
            .map_err(move |source| Error::Mirror {
                url: url.clone(),
                source,
            })
            .map(counted);
        return Ok(stream.boxed());
    }
    let digest: Digest = digest
        .parse()
        .map_err(|_| Error::Invalid(format!("layer digest {digest:?} is not sha256")))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("layer");
    let progress: shoal_p2p::upstream::OnProgress = {
        let bar = bar.clone();
        std::sync::Arc::new(move |n| bar.set(n))
    };
    upstream
        .fetch_blob_to(source, &digest, &path, Some(progress))
        .await?;
    let file = tokio::fs::File::open(&path).await?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
        .map_err(Error::Io)
        // The temporary directory lives as long as the stream reading from it.
        .map(move |chunk| {
            let _keep = &dir;
            chunk
        });
    Ok(stream.boxed())
}

/// For the node's mirror and metrics: a node that accepts connections but stalls makes the
/// pull fail, not hang.
fn http_client() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|source| Error::Mirror {
            url: "(client)".into(),
            source,
        })
}

/// The node's `(bytes_from_peers, bytes_from_upstream)` counters, from its `/status`.
async fn node_counters(node: Option<&str>) -> Option<(u64, u64)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let status = crate::status::client::fetch(&client, node?).await.ok()?;
    Some((status.bytes.from_peers, status.bytes.from_upstream))
}
