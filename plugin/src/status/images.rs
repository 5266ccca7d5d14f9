//! The images part of `shoal status`: the node never sees image names (containerd keeps them),
//! so the CLI asks containerd for its images in every namespace, reads each one's manifest from
//! containerd's content store, and says for each layer whether the node holds it, holds part of
//! it, or has it mounted lazily.

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1::namespaces_client::NamespacesClient;
use containerd_client::services::v1::{
    ListImagesRequest, ListNamespacesRequest, ReadContentRequest, content_client::ContentClient,
    images_client::ImagesClient,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tonic::Request;
use tonic::transport::Channel;

use super::NodeStatus;

/// Manifests and indexes are small; a bigger one is not read.
const MAX_MANIFEST: usize = 4 << 20;

/// One image containerd has, as the node sees its layers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStatus {
    pub namespace: String,
    pub name: String,
    /// The manifest (or index) digest the name points at.
    pub target: String,
    /// Layers of the manifest (for an index: of its first manifest).
    pub layers: usize,
    /// Layers whose blob the node holds whole.
    pub layers_complete: usize,
    /// Layers mounted lazily (their blob may be partial).
    pub layers_lazy: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error("connecting to containerd at {socket} (--address)")]
    Connect {
        socket: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("asking containerd for {what}: {}", status.message())]
    Rpc {
        what: &'static str,
        status: tonic::Status,
    },
}

fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> ImagesError {
    move |status| ImagesError::Rpc { what, status }
}

fn in_namespace<T>(message: T, namespace: &str) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = namespace.parse() {
        request.metadata_mut().insert("containerd-namespace", value);
    }
    request
}

/// containerd's images in every namespace, with what `node` holds of their layers.
pub async fn list(socket: &Path, node: &NodeStatus) -> Result<Vec<ImageStatus>, ImagesError> {
    let channel =
        containerd_client::connect(socket)
            .await
            .map_err(|source| ImagesError::Connect {
                socket: socket.display().to_string(),
                source,
            })?;
    let namespaces = NamespacesClient::new(channel.clone())
        .list(ListNamespacesRequest::default())
        .await
        .map_err(rpc("its namespaces"))?
        .into_inner()
        .namespaces;
    let complete: HashMap<&str, bool> = node
        .blobs
        .iter()
        .map(|b| (b.digest.as_str(), b.complete))
        .collect();
    let lazy: Vec<&str> = node
        .lazy_mounts
        .iter()
        .flatten()
        .map(|m| m.layer.as_str())
        .collect();
    let mut out = Vec::new();
    for namespace in namespaces {
        let images = ImagesClient::new(channel.clone())
            .list(in_namespace(ListImagesRequest::default(), &namespace.name))
            .await
            .map_err(rpc("its images"))?
            .into_inner()
            .images;
        for image in images {
            let Some(target) = image.target else { continue };
            let layers = layers_of(&channel, &namespace.name, &target.digest)
                .await
                .unwrap_or_default();
            out.push(ImageStatus {
                namespace: namespace.name.clone(),
                name: image.name,
                target: target.digest,
                layers: layers.len(),
                layers_complete: layers
                    .iter()
                    .filter(|l| complete.get(l.as_str()) == Some(&true))
                    .count(),
                layers_lazy: layers.iter().filter(|l| lazy.contains(&l.as_str())).count(),
            });
        }
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

/// The layer digests of the manifest `digest` (or of an index's first manifest).
async fn layers_of(channel: &Channel, namespace: &str, digest: &str) -> Option<Vec<String>> {
    let body = read(channel, namespace, digest).await?;
    let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
    if let Some(first) = json["manifests"].as_array().and_then(|m| m.first()) {
        let digest = first["digest"].as_str()?;
        let body = read(channel, namespace, digest).await?;
        let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
        return layer_digests(&json);
    }
    layer_digests(&json)
}

fn layer_digests(manifest: &serde_json::Value) -> Option<Vec<String>> {
    Some(
        manifest["layers"]
            .as_array()?
            .iter()
            .filter_map(|l| l["digest"].as_str().map(String::from))
            .collect(),
    )
}

/// A small blob from containerd's content store.
async fn read(channel: &Channel, namespace: &str, digest: &str) -> Option<Vec<u8>> {
    let request = ReadContentRequest {
        digest: digest.to_owned(),
        offset: 0,
        size: 0,
    };
    let mut stream = ContentClient::new(channel.clone())
        .read(in_namespace(request, namespace))
        .await
        .ok()?
        .into_inner();
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.ok()?.data);
        if body.len() > MAX_MANIFEST {
            return None;
        }
    }
    Some(body)
}
