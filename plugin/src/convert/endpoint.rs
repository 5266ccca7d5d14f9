//! Where a conversion reads from and writes to, behind one set of operations: a repository of
//! a registry (through the upstream client) or an OCI layout directory (on a blocking thread).
//! Every blob read is checked against its digest before it is used.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use indicatif::ProgressBar;
use shoal_p2p::Digest;
use shoal_p2p::upstream::{BlobBody, BlobSource, OnProgress, Upstream};

use super::layout::Layout;
use super::reference::ImageRef;
use super::{Error, MAX_JSON_BYTES};

/// One side of a conversion.
#[derive(Debug)]
pub(super) enum Endpoint {
    Registry {
        upstream: Upstream,
        source: BlobSource,
    },
    Layout(Layout),
}

impl Endpoint {
    /// The source side: a layout must exist.
    pub fn source(upstream: &Upstream, image: &ImageRef) -> Result<Self, Error> {
        Ok(match image {
            ImageRef::Registry(reference) => Endpoint::Registry {
                upstream: upstream.clone(),
                source: reference.source(),
            },
            ImageRef::Layout { dir, .. } => Endpoint::Layout(Layout::open(dir)?),
        })
    }

    /// The destination side: a layout is created if missing.
    pub fn destination(upstream: &Upstream, image: &ImageRef) -> Result<Self, Error> {
        Ok(match image {
            ImageRef::Registry(reference) => Endpoint::Registry {
                upstream: upstream.clone(),
                source: reference.source(),
            },
            ImageRef::Layout { dir, .. } => Endpoint::Layout(Layout::create(dir)?),
        })
    }

    /// The top-level manifest or index `image` names: its bytes and the media type its
    /// server announced (a layout's index.json descriptor, or the registry's Content-Type).
    pub async fn resolve(&self, image: &ImageRef) -> Result<(Bytes, Option<String>), Error> {
        match (self, image) {
            (Endpoint::Registry { upstream, source }, ImageRef::Registry(reference)) => {
                let response = upstream
                    .manifest(source, reference.object(), &[], false)
                    .await?;
                // The client checks a GET by digest already; this keeps the promise local.
                if let Some(digest) = &reference.digest
                    && Digest::of(&response.body).to_string() != *digest
                {
                    return Err(Error::Digest {
                        what: format!("manifest of {image}"),
                    });
                }
                Ok((response.body, response.content_type))
            }
            (Endpoint::Layout(layout), ImageRef::Layout { tag, .. }) => {
                let layout = layout.clone();
                let tag = tag.clone();
                let (descriptor, body) = blocking(move || {
                    let descriptor = layout.resolve(tag.as_deref())?;
                    let digest = parse_digest(descriptor.digest().as_ref())?;
                    Ok((descriptor, layout.read_blob(&digest)?))
                })
                .await?;
                Ok((Bytes::from(body), Some(descriptor.media_type().to_string())))
            }
            _ => Err(Error::Reference {
                value: image.to_string(),
                reason: "does not name this endpoint".into(),
            }),
        }
    }

    /// A manifest, config or other small blob, by digest, capped at 4 MiB and checked.
    pub async fn small_blob(
        &self,
        digest: &Digest,
        size: u64,
        manifest: bool,
    ) -> Result<Bytes, Error> {
        if size > MAX_JSON_BYTES {
            return Err(Error::TooLarge {
                what: format!("{digest} ({size} bytes)"),
            });
        }
        let data = match self {
            Endpoint::Registry { upstream, source } if manifest => {
                upstream
                    .manifest(source, &digest.to_string(), &[], false)
                    .await?
                    .body
            }
            Endpoint::Registry { upstream, source } => {
                upstream.fetch_range(source, digest, 0..size).await?
            }
            Endpoint::Layout(layout) => {
                let (layout, d) = (layout.clone(), *digest);
                Bytes::from(blocking(move || layout.read_blob(&d)).await?)
            }
        };
        if Digest::of(&data) != *digest || data.len() as u64 != size {
            return Err(Error::Digest {
                what: format!("blob {digest}"),
            });
        }
        Ok(data)
    }

    /// A blob streamed into `path` and checked; returns its size.
    pub async fn blob_to_file(
        &self,
        digest: &Digest,
        path: &Path,
        bar: &ProgressBar,
    ) -> Result<u64, Error> {
        match self {
            Endpoint::Registry { upstream, source } => {
                let bar = bar.clone();
                let progress: OnProgress = Arc::new(move |n| bar.set_position(n));
                Ok(upstream
                    .fetch_blob_to(source, digest, path, Some(progress))
                    .await?)
            }
            Endpoint::Layout(layout) => {
                let (layout, d, path, bar) =
                    (layout.clone(), *digest, path.to_owned(), bar.clone());
                blocking(move || layout.copy_blob_to(&d, &path, &|n| bar.set_position(n))).await
            }
        }
    }

    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, Error> {
        match self {
            Endpoint::Registry { upstream, source } => {
                Ok(upstream.blob_exists(source, digest).await?)
            }
            Endpoint::Layout(layout) => Ok(layout.has_blob(digest)),
        }
    }

    /// Makes `digest` present here, taking it from `from` (which has it): a cross-repository
    /// mount when both are repositories of one registry, else a download and upload through
    /// `work`.
    pub async fn copy_blob_from(
        &self,
        from: &Endpoint,
        digest: &Digest,
        size: u64,
        work: &Path,
        bar: &ProgressBar,
    ) -> Result<(), Error> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        if let (Endpoint::Registry { upstream, source }, Endpoint::Registry { source: src, .. }) =
            (self, from)
            && src.registry == source.registry
            && upstream.mount_blob(source, digest, &src.repository).await?
        {
            return Ok(());
        }
        let path = work.join(format!("{}.copy", digest.hex()));
        let result = async {
            from.blob_to_file(digest, &path, bar).await?;
            self.put_blob_file(digest, size, &path, bar).await
        }
        .await;
        let _ = tokio::fs::remove_file(&path).await;
        result
    }

    /// Stores the file at `path` as blob `digest`, unless it is already here.
    pub async fn put_blob_file(
        &self,
        digest: &Digest,
        size: u64,
        path: &Path,
        bar: &ProgressBar,
    ) -> Result<(), Error> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        bar.set_position(0);
        match self {
            Endpoint::Registry { upstream, source } => {
                let watcher = bar.clone();
                let body = BlobBody::File {
                    path: path.to_owned(),
                    progress: Some(Arc::new(move |n| watcher.set_position(n))),
                };
                Ok(upstream.push_blob(source, digest, size, body).await?)
            }
            Endpoint::Layout(layout) => {
                let (layout, d, path, bar) =
                    (layout.clone(), *digest, path.to_owned(), bar.clone());
                blocking(move || layout.put_blob_file(&d, &path, &|n| bar.set_position(n))).await
            }
        }
    }

    /// Stores a config (or other small blob); returns its digest.
    pub async fn put_blob_bytes(&self, data: Bytes) -> Result<Digest, Error> {
        let digest = Digest::of(&data);
        if self.has_blob(&digest).await? {
            return Ok(digest);
        }
        match self {
            Endpoint::Registry { upstream, source } => {
                let size = data.len() as u64;
                upstream
                    .push_blob(source, &digest, size, BlobBody::Bytes(data))
                    .await?;
            }
            Endpoint::Layout(layout) => {
                let layout = layout.clone();
                blocking(move || layout.put_blob_bytes(&data)).await?;
            }
        }
        Ok(digest)
    }

    /// Stores a manifest or index by its digest (a child of an index, untagged); returns it.
    pub async fn put_manifest(&self, data: Bytes, media_type: &str) -> Result<Digest, Error> {
        match self {
            Endpoint::Registry { upstream, source } => {
                let digest = Digest::of(&data).to_string();
                Ok(upstream
                    .push_manifest(source, &digest, media_type, data)
                    .await?)
            }
            Endpoint::Layout(layout) => {
                let layout = layout.clone();
                blocking(move || layout.put_blob_bytes(&data)).await
            }
        }
    }

    /// Stores the top-level manifest or index and names it `tag`; returns its digest.
    pub async fn put_tagged(
        &self,
        data: Bytes,
        media_type: &str,
        tag: &str,
    ) -> Result<Digest, Error> {
        match self {
            Endpoint::Registry { upstream, source } => Ok(upstream
                .push_manifest(source, tag, media_type, data)
                .await?),
            Endpoint::Layout(layout) => {
                let layout = layout.clone();
                let size = data.len() as u64;
                let (media_type, tag) = (media_type.to_owned(), tag.to_owned());
                blocking(move || {
                    let digest = layout.put_blob_bytes(&data)?;
                    let descriptor = oci_spec::image::Descriptor::new(
                        media_type.as_str().into(),
                        size,
                        oci_digest(&digest)?,
                    );
                    layout.tag(descriptor, &tag)?;
                    Ok(digest)
                })
                .await
            }
        }
    }
}

/// Runs blocking file work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(Error::Task)?
}

/// An oci-spec digest as Shoal's (sha256 only).
pub(super) fn parse_digest(digest: &str) -> Result<Digest, Error> {
    digest.parse().map_err(|_| Error::Unsupported {
        what: "digest",
        value: digest.to_owned(),
    })
}

pub(super) fn oci_digest(digest: &Digest) -> Result<oci_spec::image::Digest, Error> {
    digest.to_string().parse().map_err(|_| Error::Unsupported {
        what: "digest",
        value: digest.to_string(),
    })
}
