//! One image manifest converted: each layer downloaded to a file, rewritten as eStargz on a
//! blocking thread and stored at the destination; the config's `rootfs.diff_ids` rewritten to
//! match (edited as JSON, so fields this code does not know survive); and a new OCI manifest.
//!
//! Layers that already carry a TOC digest annotation are eStargz and are copied unchanged (their
//! diff id stays). A layer that appears twice is converted once per run.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::Mutex;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use oci_spec::image::{Descriptor, ImageManifest, MediaType};
use serde_json::Value;
use shoal_fuse::estargz::{self, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION};
use shoal_p2p::Digest;

use super::endpoint::{Endpoint, oci_digest, parse_digest};
use super::{ConvertOptions, ConvertedImage, ConvertedLayer, Error, Progress};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// What every manifest of one run shares.
pub(super) struct Ctx<'a> {
    pub source: &'a Endpoint,
    pub dest: &'a Endpoint,
    pub opts: &'a ConvertOptions,
    pub work: &'a std::path::Path,
    pub progress: &'a Progress,
    /// Layers done in this run, by source digest.
    pub done: Mutex<HashMap<Digest, LayerOut>>,
}

/// A layer as it goes into the new manifest.
#[derive(Clone, Debug)]
pub(super) struct LayerOut {
    descriptor: Descriptor,
    /// The new diff id, or `None` to keep the config's (copied layers).
    diff_id: Option<String>,
    summary: ConvertedLayer,
}

/// Converts the manifest `body`; returns the summary and the new manifest's bytes, whose
/// config and layers are already at the destination.
pub(super) async fn convert_manifest(
    ctx: &Ctx<'_>,
    body: &[u8],
) -> Result<(ConvertedImage, Bytes), Error> {
    let mut manifest: ImageManifest = serde_json::from_slice(body).map_err(|e| Error::Json {
        what: "image manifest".into(),
        source: e,
    })?;
    let config_type = manifest.config().media_type().to_string();
    if config_type != MediaType::ImageConfig.to_string() && config_type != DOCKER_CONFIG {
        return Err(Error::Unsupported {
            what: "config media type (not a container image)",
            value: config_type,
        });
    }
    let config_digest = parse_digest(manifest.config().digest().as_ref())?;
    let config = ctx
        .source
        .small_blob(&config_digest, manifest.config().size(), false)
        .await?;
    let platform = platform_of(&config);

    let jobs = ctx.opts.jobs.max(1);
    let layers: Vec<LayerOut> = futures::stream::iter(manifest.layers().iter().enumerate())
        .map(|(i, layer)| convert_layer(ctx, i, layer))
        .buffered(jobs)
        .try_collect()
        .await?;

    let diff_ids: Vec<Option<String>> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config = Bytes::from(rewrite_config(&config, &diff_ids)?);
    let config_size = config.len() as u64;
    let config_digest = ctx.dest.put_blob_bytes(config).await?;

    manifest.set_media_type(Some(MediaType::ImageManifest));
    manifest.set_config(Descriptor::new(
        MediaType::ImageConfig,
        config_size,
        oci_digest(&config_digest)?,
    ));
    manifest.set_layers(layers.iter().map(|l| l.descriptor.clone()).collect());
    let bytes = Bytes::from(serde_json::to_vec(&manifest).map_err(|e| Error::Json {
        what: "the new manifest".into(),
        source: e,
    })?);
    let image = ConvertedImage {
        platform,
        digest: Digest::of(&bytes),
        size: bytes.len() as u64,
        layers: layers.into_iter().map(|l| l.summary).collect(),
    };
    Ok((image, bytes))
}

/// Whether a manifest body (of `media_type`, if the server said) is a single-image manifest.
pub(super) fn is_manifest_type(media_type: &str) -> bool {
    media_type == MediaType::ImageManifest.to_string() || media_type == DOCKER_MANIFEST
}

/// `os/architecture[/variant]` from an image config.
pub(super) fn platform_of(config: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(config).ok()?;
    let os = value.get("os")?.as_str()?;
    let arch = value.get("architecture")?.as_str()?;
    Some(match value.get("variant").and_then(Value::as_str) {
        Some(variant) => format!("{os}/{arch}/{variant}"),
        None => format!("{os}/{arch}"),
    })
}

async fn convert_layer(ctx: &Ctx<'_>, index: usize, layer: &Descriptor) -> Result<LayerOut, Error> {
    let digest = parse_digest(layer.digest().as_ref())?;
    if let Some(done) = ctx.done.lock().ok().and_then(|d| d.get(&digest).cloned()) {
        return Ok(done);
    }
    let bar = ctx.progress.layer(index, &digest, layer.size());
    let toc = layer
        .annotations()
        .as_ref()
        .and_then(|a| a.get(TOC_DIGEST_ANNOTATION))
        .cloned();
    let out = match toc {
        Some(toc_digest) => copy_layer(ctx, layer, &digest, toc_digest, &bar).await,
        None => rewrite_layer(ctx, layer, &digest, &bar).await,
    };
    match &out {
        Ok(out) => bar.finish_with_message(format!(
            "{} → {}",
            human(out.summary.source_size),
            human(out.summary.size)
        )),
        Err(_) => bar.abandon_with_message("failed"),
    }
    let out = out?;
    if let Ok(mut done) = ctx.done.lock() {
        done.insert(digest, out.clone());
    }
    Ok(out)
}

/// An eStargz layer: made present at the destination as it is.
async fn copy_layer(
    ctx: &Ctx<'_>,
    layer: &Descriptor,
    digest: &Digest,
    toc_digest: String,
    bar: &ProgressBar,
) -> Result<LayerOut, Error> {
    bar.set_message("copy (already eStargz)");
    ctx.dest
        .copy_blob_from(ctx.source, digest, layer.size(), ctx.work, bar)
        .await?;
    let mut descriptor = layer.clone();
    if descriptor.media_type().to_string() == DOCKER_LAYER_GZIP {
        descriptor.set_media_type(MediaType::ImageLayerGzip);
    }
    Ok(LayerOut {
        descriptor,
        diff_id: None,
        summary: ConvertedLayer {
            source: *digest,
            source_size: layer.size(),
            digest: *digest,
            size: layer.size(),
            toc_digest,
            copied: true,
        },
    })
}

/// Any other tar layer: downloaded, converted, stored.
async fn rewrite_layer(
    ctx: &Ctx<'_>,
    layer: &Descriptor,
    digest: &Digest,
    bar: &ProgressBar,
) -> Result<LayerOut, Error> {
    let media_type = layer.media_type().to_string();
    let readable = [
        MediaType::ImageLayer.to_string(),
        MediaType::ImageLayerGzip.to_string(),
        DOCKER_LAYER_GZIP.to_owned(),
    ];
    if !readable.contains(&media_type) || layer.urls().is_some() {
        return Err(Error::Unsupported {
            what: "layer (only distributable tar and tar+gzip layers convert)",
            value: format!("{digest} of type {media_type}"),
        });
    }
    let temp = |suffix: &str| {
        tempfile::Builder::new()
            .prefix(&digest.hex()[..12])
            .suffix(suffix)
            .tempfile_in(ctx.work)
            .map(tempfile::NamedTempFile::into_temp_path)
            .map_err(|e| Error::Io {
                doing: "creating a file in",
                path: ctx.work.to_owned(),
                source: e,
            })
    };
    let input = temp(".tar")?;
    bar.set_message("download");
    ctx.source.blob_to_file(digest, &input, bar).await?;

    bar.set_message("convert");
    bar.set_position(0);
    let output = temp(".esgz")?;
    let opts = estargz::WriteOptions {
        chunk_size: ctx.opts.chunk_size,
        prioritized: ctx.opts.prioritized.clone(),
        ..estargz::WriteOptions::default()
    };
    let (in_path, out_path, watcher) = (input.to_path_buf(), output.to_path_buf(), bar.clone());
    let layer_digest = *digest;
    let written = super::endpoint::blocking(move || {
        let io_err = |path: &std::path::Path, doing| {
            let path = path.to_owned();
            move |source| Error::Io {
                doing,
                path,
                source,
            }
        };
        let reader = File::open(&in_path).map_err(io_err(&in_path, "opening"))?;
        let reader = Counting {
            inner: BufReader::with_capacity(1 << 20, reader),
            read: 0,
            bar: watcher,
        };
        let file = File::create(&out_path).map_err(io_err(&out_path, "creating"))?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        let written =
            estargz::convert(reader, &mut writer, &opts).map_err(|source| Error::Estargz {
                digest: layer_digest,
                source,
            })?;
        writer.flush().map_err(io_err(&out_path, "writing"))?;
        Ok(written)
    })
    .await?;
    drop(input);

    let new_digest = parse_digest(&written.digest)?;
    bar.set_message("upload");
    bar.set_length(written.size);
    ctx.dest
        .put_blob_file(&new_digest, written.size, &output, bar)
        .await?;
    drop(output);

    let mut descriptor = Descriptor::new(
        MediaType::ImageLayerGzip,
        written.size,
        oci_digest(&new_digest)?,
    );
    let mut annotations = layer.annotations().clone().unwrap_or_default();
    annotations.insert(TOC_DIGEST_ANNOTATION.to_owned(), written.toc_digest.clone());
    annotations.insert(
        UNCOMPRESSED_SIZE_ANNOTATION.to_owned(),
        written.uncompressed_size.to_string(),
    );
    descriptor.set_annotations(Some(annotations));
    Ok(LayerOut {
        descriptor,
        diff_id: Some(written.diff_id),
        summary: ConvertedLayer {
            source: *digest,
            source_size: layer.size(),
            digest: new_digest,
            size: written.size,
            toc_digest: written.toc_digest,
            copied: false,
        },
    })
}

/// Replaces `rootfs.diff_ids[i]` where `diff_ids[i]` is set; everything else in the config
/// (history, labels, fields newer than this code) is kept as it was.
pub(super) fn rewrite_config(config: &[u8], diff_ids: &[Option<String>]) -> Result<Vec<u8>, Error> {
    let mut value: Value = serde_json::from_slice(config).map_err(|e| Error::Json {
        what: "image config".into(),
        source: e,
    })?;
    let ids = value
        .pointer_mut("/rootfs/diff_ids")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| Error::Image {
            reason: "config has no rootfs.diff_ids list".into(),
        })?;
    if ids.len() != diff_ids.len() {
        return Err(Error::Image {
            reason: format!(
                "config lists {} diff ids for {} layers",
                ids.len(),
                diff_ids.len()
            ),
        });
    }
    for (slot, new) in ids.iter_mut().zip(diff_ids) {
        if let Some(new) = new {
            *slot = Value::String(new.clone());
        }
    }
    serde_json::to_vec(&value).map_err(|e| Error::Json {
        what: "the new config".into(),
        source: e,
    })
}

/// Counts bytes read into a progress bar.
struct Counting<R> {
    inner: R,
    read: u64,
    bar: ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        self.bar.set_position(self.read);
        Ok(n)
    }
}

/// `1.5 MiB`.
pub(super) fn human(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rewrite_replaces_diff_ids_and_keeps_the_rest() -> anyhow::Result<()> {
        let config = br#"{
            "architecture": "amd64", "os": "linux", "variant": "v8",
            "config": {"Cmd": ["/bin/sh"], "Labels": {"a": "b"}},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa", "sha256:bb"]},
            "history": [{"created_by": "x"}, {"created_by": "y", "empty_layer": true}],
            "x-future-field": {"nested": [1, 2, 3]}
        }"#;
        let out = rewrite_config(config, &[Some("sha256:cc".into()), None])?;
        let out: Value = serde_json::from_slice(&out)?;
        let mut want: Value = serde_json::from_slice(config)?;
        want["rootfs"]["diff_ids"][0] = "sha256:cc".into();
        assert_eq!(out, want);
        assert_eq!(platform_of(config).as_deref(), Some("linux/amd64/v8"));

        let err = rewrite_config(config, &[None]);
        assert!(matches!(err, Err(Error::Image { .. })), "{err:?}");
        let err = rewrite_config(br#"{"rootfs": {}}"#, &[]);
        assert!(matches!(err, Err(Error::Image { .. })), "{err:?}");
        assert!(rewrite_config(b"not json", &[]).is_err());
        Ok(())
    }
}
