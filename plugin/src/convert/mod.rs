//! `shoal convert SRC DST`: an image rewritten so that every layer is eStargz, which Shoal's
//! snapshotter can mount lazily, while it stays a valid image for any runtime.
//!
//! SRC and DST are registry images (`host[:port]/repo[:tag|@digest]`, `busybox`) or OCI layouts
//! (`oci:<dir>[:tag]`), see [`ImageRef`]. For a single manifest the result is one OCI manifest;
//! for an index (or Docker manifest list) each Linux manifest, or only those of
//! [`ConvertOptions::platforms`], is converted and a new OCI index lists them.
//!
//! Per layer (`image.rs`): download into a work directory (digest checked), convert with
//! [`shoal_fuse::estargz::convert`] on a blocking thread, store at the destination, and
//! annotate the descriptor with the TOC digest and uncompressed size. The config's diff ids
//! follow; its other fields are kept. Memory stays bounded: layers only ever pass through
//! files, and manifests, indexes and configs are capped at 4 MiB.
//!
//! Layout: `reference.rs` parses image names, `endpoint.rs` reads and writes registries and
//! layouts behind one interface, `layout.rs` is the OCI layout on disk, `image.rs` converts
//! one manifest, and this file walks an index and reports.

mod endpoint;
mod image;
mod layout;
mod reference;

use std::collections::HashMap;
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use shoal_p2p::Digest;
use shoal_p2p::upstream::Upstream;

use self::endpoint::{Endpoint, oci_digest, parse_digest};
use self::image::{Ctx, human, is_manifest_type};
pub use self::reference::ImageRef;

/// Manifests, indexes and configs larger than this are refused (distribution's own limit).
const MAX_JSON_BYTES: u64 = 4 << 20;

const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// How to convert.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Uncompressed bytes per eStargz chunk (the unit of lazy fetching).
    pub chunk_size: u64,
    /// Paths (as in the layer, e.g. `bin/sh`) to put first in every layer that has them, before
    /// a prefetch landmark; empty means no prefetch (a `.no.prefetch.landmark`).
    pub prioritized: Vec<String>,
    /// `os/arch[/variant]` of the manifests to convert from an index; empty means every Linux
    /// one. Others are left out of the new index.
    pub platforms: Vec<String>,
    /// Where layers are staged (a temporary directory inside it); the system's temp dir if
    /// `None`. Needs room for about twice the largest layers being converted at once.
    pub work_dir: Option<PathBuf>,
    /// Layers of one image converted at once.
    pub jobs: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            chunk_size: 4 << 20,
            prioritized: Vec::new(),
            platforms: Vec::new(),
            work_dir: None,
            jobs: 3,
        }
    }
}

/// What a conversion made.
#[derive(Clone, Debug)]
pub struct Converted {
    /// Where it went, as given.
    pub destination: String,
    /// The manifest or index the destination's tag names now.
    pub digest: Digest,
    pub media_type: String,
    pub images: Vec<ConvertedImage>,
    /// Platforms of the source index that were left out.
    pub skipped: Vec<String>,
}

/// One converted image manifest.
#[derive(Clone, Debug)]
pub struct ConvertedImage {
    /// `linux/amd64`, from the config.
    pub platform: Option<String>,
    pub digest: Digest,
    pub size: u64,
    pub layers: Vec<ConvertedLayer>,
}

/// One layer, before and after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertedLayer {
    pub source: Digest,
    pub source_size: u64,
    pub digest: Digest,
    pub size: u64,
    pub toc_digest: String,
    /// Already eStargz: copied as it was.
    pub copied: bool,
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {value:?}: {reason}")]
    Reference { value: String, reason: String },

    #[error(transparent)]
    Upstream(#[from] shoal_p2p::upstream::Error),

    #[error("OCI layout {dir}: {reason}")]
    Layout { dir: PathBuf, reason: String },

    #[error("{doing} {path}")]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} is not valid JSON of its kind")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{what} is larger than the 4 MiB limit")]
    TooLarge { what: String },

    #[error("{what} does not match its digest")]
    Digest { what: String },

    #[error("unsupported {what}: {value}")]
    Unsupported { what: &'static str, value: String },

    #[error("invalid image: {reason}")]
    Image { reason: String },

    #[error("no manifest to convert: {reason}")]
    NoPlatform { reason: String },

    #[error("converting layer {digest} to eStargz")]
    Estargz {
        digest: Digest,
        #[source]
        source: shoal_fuse::estargz::Error,
    },

    #[error("a conversion task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Progress bars on stderr, one per layer; drawn only when stderr is a terminal.
#[derive(Clone, Debug)]
pub struct Progress {
    multi: MultiProgress,
}

impl Progress {
    pub fn stderr() -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
        }
    }

    pub fn hidden() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
        }
    }

    fn layer(&self, index: usize, digest: &Digest, len: u64) -> ProgressBar {
        let style = ProgressStyle::with_template(
            "{prefix} {msg:24} [{bar:30}] {binary_bytes}/{binary_total_bytes}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = ProgressBar::new(len)
            .with_style(style)
            .with_prefix(format!("layer {index} {}", &digest.hex()[..12]));
        self.multi.add(bar)
    }
}

/// Reads a `--prioritize` file: one path per line; blank lines and `#` comments are skipped,
/// and a leading `/` or `./` is dropped (layers name files without it).
pub fn read_path_list(path: &Path) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        doing: "reading",
        path: path.to_owned(),
        source: e,
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            line.trim_start_matches("./")
                .trim_start_matches('/')
                .to_owned()
        })
        .collect())
}

/// Converts `src` into `dst`; see the module docs.
pub async fn convert(
    upstream: &Upstream,
    src: &ImageRef,
    dst: &ImageRef,
    opts: &ConvertOptions,
    progress: &Progress,
) -> Result<Converted, Error> {
    let tag = dst.destination_tag()?;
    let source = Endpoint::source(upstream, src)?;
    let dest = Endpoint::destination(upstream, dst)?;
    let work_parent = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("shoal-convert-")
        .tempdir_in(&work_parent)
        .map_err(|e| Error::Io {
            doing: "creating a work directory in",
            path: work_parent.clone(),
            source: e,
        })?;
    let ctx = Ctx {
        source: &source,
        dest: &dest,
        opts,
        work: work.path(),
        progress,
        done: Mutex::new(HashMap::new()),
    };

    let (body, announced) = source.resolve(src).await?;
    let media_type = media_type_of(&body, announced.as_deref())?;
    let mut skipped = Vec::new();
    let (top, images) = if is_manifest_type(&media_type) {
        let (image, manifest) = image::convert_manifest(&ctx, &body).await?;
        if !opts.platforms.is_empty()
            && !image
                .platform
                .as_deref()
                .is_some_and(|p| opts.platforms.iter().any(|want| want == p))
        {
            return Err(Error::NoPlatform {
                reason: format!(
                    "{src} is a single {} image, not {}",
                    image.platform.as_deref().unwrap_or("unknown-platform"),
                    opts.platforms.join(", ")
                ),
            });
        }
        let manifest_type = MediaType::ImageManifest.to_string();
        let digest = dest.put_tagged(manifest, &manifest_type, &tag).await?;
        ((digest, manifest_type), vec![image])
    } else {
        let (index, images) = convert_index(&ctx, &body, &mut skipped).await?;
        let index_type = MediaType::ImageIndex.to_string();
        let digest = dest.put_tagged(index, &index_type, &tag).await?;
        ((digest, index_type), images)
    };
    Ok(Converted {
        destination: dst.to_string(),
        digest: top.0,
        media_type: top.1,
        images,
        skipped,
    })
}

/// Converts the chosen manifests of an index; returns the new index and what went in it.
async fn convert_index(
    ctx: &Ctx<'_>,
    body: &[u8],
    skipped: &mut Vec<String>,
) -> Result<(Bytes, Vec<ConvertedImage>), Error> {
    let mut index: ImageIndex = serde_json::from_slice(body).map_err(|e| Error::Json {
        what: "image index".into(),
        source: e,
    })?;
    let mut images = Vec::new();
    let mut kept: Vec<Descriptor> = Vec::new();
    for entry in index.manifests() {
        let platform = entry.platform().as_ref().map(|p| {
            let base = format!("{}/{}", p.os(), p.architecture());
            match p.variant() {
                Some(variant) => format!("{base}/{variant}"),
                None => base,
            }
        });
        let wanted = match &platform {
            Some(p) if ctx.opts.platforms.is_empty() => p.starts_with("linux/"),
            Some(p) => ctx.opts.platforms.iter().any(|want| want == p),
            None => false,
        };
        if !wanted || !is_manifest_type(entry.media_type().as_ref()) {
            skipped.push(platform.unwrap_or_else(|| format!("{} (no platform)", entry.digest())));
            continue;
        }
        let digest = parse_digest(entry.digest().as_ref())?;
        let child = ctx.source.small_blob(&digest, entry.size(), true).await?;
        let (mut image, manifest) = image::convert_manifest(ctx, &child).await?;
        image.platform = platform.or(image.platform);
        let size = manifest.len() as u64;
        let manifest_type = MediaType::ImageManifest.to_string();
        let digest = ctx.dest.put_manifest(manifest, &manifest_type).await?;
        let mut descriptor = entry.clone();
        descriptor.set_media_type(MediaType::ImageManifest);
        descriptor.set_digest(oci_digest(&digest)?);
        descriptor.set_size(size);
        kept.push(descriptor);
        images.push(image);
    }
    if kept.is_empty() {
        let wanted = if ctx.opts.platforms.is_empty() {
            "linux".to_owned()
        } else {
            ctx.opts.platforms.join(", ")
        };
        return Err(Error::NoPlatform {
            reason: format!("the index has no {wanted} image (it has {skipped:?})"),
        });
    }
    index.set_media_type(Some(MediaType::ImageIndex));
    index.set_manifests(kept);
    let bytes = serde_json::to_vec(&index).map_err(|e| Error::Json {
        what: "the new index".into(),
        source: e,
    })?;
    Ok((Bytes::from(bytes), images))
}

/// The media type of a manifest body: its own `mediaType`, else what the server said, else
/// its shape (`manifests` for an index, `layers` for a manifest).
fn media_type_of(body: &[u8], announced: Option<&str>) -> Result<String, Error> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| Error::Json {
        what: "manifest".into(),
        source: e,
    })?;
    let own = value.get("mediaType").and_then(|v| v.as_str());
    let announced = announced.filter(|t| !t.is_empty() && !t.starts_with("application/json"));
    let shaped = if value.get("manifests").is_some() {
        Some(MediaType::ImageIndex.to_string())
    } else if value.get("layers").is_some() {
        Some(MediaType::ImageManifest.to_string())
    } else {
        None
    };
    let media_type = own
        .map(str::to_owned)
        .or(announced.map(str::to_owned))
        .or(shaped)
        .ok_or_else(|| Error::Image {
            reason: "the manifest has no media type and neither layers nor manifests".into(),
        })?;
    let index =
        media_type == MediaType::ImageIndex.to_string() || media_type == DOCKER_MANIFEST_LIST;
    if !index && !is_manifest_type(&media_type) {
        return Err(Error::Unsupported {
            what: "manifest media type",
            value: media_type,
        });
    }
    Ok(media_type)
}

impl fmt::Display for Converted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for image in &self.images {
            let platform = image.platform.as_deref().unwrap_or("image");
            writeln!(f, "{platform} {}", image.digest)?;
            for (i, layer) in image.layers.iter().enumerate() {
                let how = if layer.copied {
                    " (already eStargz)"
                } else {
                    ""
                };
                writeln!(
                    f,
                    "  layer {i}: {} {} -> {} {}{how}",
                    short(&layer.source),
                    human(layer.source_size),
                    short(&layer.digest),
                    human(layer.size),
                )?;
                writeln!(f, "    toc {}", layer.toc_digest)?;
            }
        }
        if !self.skipped.is_empty() {
            writeln!(f, "left out: {}", self.skipped.join(", "))?;
        }
        writeln!(f, "converted {}", self.destination)?;
        write!(f, "digest: {}", self.digest)
    }
}

fn short(digest: &Digest) -> String {
    format!("sha256:{}", &digest.hex()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_comes_from_the_body_then_the_server_then_the_shape() -> anyhow::Result<()> {
        let oci_index = MediaType::ImageIndex.to_string();
        let oci_manifest = MediaType::ImageManifest.to_string();
        let list = format!(r#"{{"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[]}}"#);
        assert_eq!(media_type_of(list.as_bytes(), None)?, DOCKER_MANIFEST_LIST);
        assert_eq!(
            media_type_of(br#"{"manifests":[]}"#, Some(&oci_index))?,
            oci_index
        );
        assert_eq!(media_type_of(br#"{"layers":[]}"#, None)?, oci_manifest);
        let artifact = br#"{"mediaType":"application/vnd.example+json","layers":[]}"#;
        assert!(matches!(
            media_type_of(artifact, None),
            Err(Error::Unsupported { .. })
        ));
        assert!(media_type_of(br#"{"schemaVersion":1}"#, None).is_err());
        Ok(())
    }
}
