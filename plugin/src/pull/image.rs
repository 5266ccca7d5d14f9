//! The image being pulled: its (index,) manifest and config, fetched from the registry and
//! checked against their digests, and the chain ids containerd names snapshots by.

use std::collections::HashMap;

use bytes::Bytes;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};
use shoal_p2p::Digest;
use shoal_p2p::upstream::Upstream;

use super::Error;
use crate::reference::Reference;

/// Configs are small JSON documents; refuse anything absurd before reading it.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// One layer, as the manifest lists it.
#[derive(Clone, Debug)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub annotations: HashMap<String, String>,
}

/// A multi-platform index the manifest was picked from.
#[derive(Clone, Debug)]
pub struct Index {
    pub digest: String,
    pub media_type: String,
    pub body: Bytes,
}

/// Everything a pull needs to know about the image.
#[derive(Clone, Debug)]
pub struct Image {
    pub index: Option<Index>,
    pub manifest: Bytes,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    pub config: Bytes,
    pub config_digest: String,
    pub layers: Vec<Layer>,
}

fn sha256(body: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(body)))
}

fn invalid(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{what}: {e}"))
}

impl Image {
    /// Fetches the manifest for `platform` (`os/arch`), and its config.
    pub async fn fetch(
        upstream: &Upstream,
        reference: &Reference,
        platform: &str,
    ) -> Result<Self, Error> {
        let source = reference.source();
        let top = upstream
            .manifest(&source, reference.object(), &[], false)
            .await?;
        if top.status != 200 {
            return Err(Error::Invalid(format!(
                "registry answered {} for {reference}",
                top.status
            )));
        }
        let top_digest = sha256(&top.body);
        if let Some(pinned) = &reference.digest
            && *pinned != top_digest
        {
            return Err(Error::Invalid(format!(
                "{reference} resolved to {top_digest}"
            )));
        }
        let top_type = top.content_type.clone().unwrap_or_default();
        let is_index = INDEX_TYPES.contains(&top_type.as_str())
            || serde_json::from_slice::<serde_json::Value>(&top.body)
                .ok()
                .is_some_and(|v| v.get("manifests").is_some());
        let (index, manifest, manifest_digest, manifest_type) = if is_index {
            let parsed =
                ImageIndex::from_reader(&top.body[..]).map_err(|e| invalid("image index", e))?;
            // `os/arch[/variant]`; without a variant any variant of the architecture will do.
            let mut parts = platform.split('/');
            let (os, arch, variant) = match (parts.next(), parts.next(), parts.next()) {
                (Some(os), Some(arch), variant) => (os, arch, variant),
                _ => ("linux", platform, None),
            };
            let chosen = parsed
                .manifests()
                .iter()
                .find(|m| {
                    m.platform().as_ref().is_some_and(|p| {
                        p.os().to_string() == os
                            && p.architecture().to_string() == arch
                            && variant.is_none_or(|v| p.variant().as_deref() == Some(v))
                    })
                })
                .ok_or_else(|| {
                    Error::Invalid(format!("{reference} has no manifest for {platform}"))
                })?;
            let digest = chosen.digest().to_string();
            let manifest = upstream.manifest(&source, &digest, &[], false).await?;
            if manifest.status != 200 {
                return Err(Error::Invalid(format!(
                    "registry answered {} for manifest {digest} of {reference}",
                    manifest.status
                )));
            }
            let media_type = chosen.media_type().to_string();
            let index = Index {
                digest: top_digest,
                media_type: if top_type.is_empty() {
                    INDEX_TYPES[0].to_owned()
                } else {
                    top_type
                },
                body: top.body,
            };
            (Some(index), manifest.body, digest, media_type)
        } else {
            let media_type = if top_type.is_empty() {
                "application/vnd.oci.image.manifest.v1+json".to_owned()
            } else {
                top_type
            };
            (None, top.body, top_digest, media_type)
        };
        let parsed =
            ImageManifest::from_reader(&manifest[..]).map_err(|e| invalid("image manifest", e))?;
        let config_desc = parsed.config();
        let config_digest: Digest = config_desc
            .digest()
            .to_string()
            .parse()
            .map_err(|_| Error::Invalid("config digest is not sha256".into()))?;
        let size = config_desc.size();
        if size > MAX_CONFIG_BYTES {
            return Err(Error::Invalid(format!(
                "image config of {size} bytes is over the {MAX_CONFIG_BYTES}-byte limit"
            )));
        }
        let config = upstream
            .fetch_range(&source, &config_digest, 0..size)
            .await?;
        if Digest::of(&config) != config_digest {
            return Err(Error::Invalid(format!(
                "config {config_digest} does not hash to its digest"
            )));
        }
        let layers = parsed
            .layers()
            .iter()
            .map(|l| Layer {
                digest: l.digest().to_string(),
                size: l.size(),
                media_type: l.media_type().to_string(),
                annotations: l.annotations().clone().unwrap_or_default(),
            })
            .collect();
        Ok(Image {
            index,
            manifest,
            manifest_digest,
            manifest_media_type: manifest_type,
            config,
            config_digest: config_digest.to_string(),
            layers,
        })
    }

    /// The config's `rootfs.diff_ids`, one per layer.
    pub fn diff_ids(&self) -> Result<Vec<String>, Error> {
        let config = ImageConfiguration::from_reader(&self.config[..])
            .map_err(|e| invalid("image config", e))?;
        let ids = config.rootfs().diff_ids().clone();
        if ids.len() != self.layers.len() {
            return Err(Error::Invalid(format!(
                "the config lists {} diff ids for {} layers",
                ids.len(),
                self.layers.len()
            )));
        }
        Ok(ids)
    }
}

/// containerd's chain ids: the first layer's diff id, then `sha256(parent + " " + diff id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for id in diff_ids {
        let next = match out.last() {
            None => id.clone(),
            Some(parent) => sha256(format!("{parent} {id}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_match_containerd() {
        // chainID(a, b) = sha256("a b"), as containerd's identity.ChainID computes it.
        let diff_ids = [
            "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4",
            "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4",
        ]
        .map(String::from);
        let chains = chain_ids(&diff_ids);
        assert_eq!(chains[0], diff_ids[0]);
        assert_eq!(
            chains[1],
            "sha256:4c7048f6aa2475cea003298d6f2dd9b9e1295d787015684fc26a77739498dce3"
        );
    }
}
