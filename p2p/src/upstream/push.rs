//! The write side of the distribution API, for `shoal convert`: does a blob exist, upload one
//! (monolithic: `POST /v2/<repo>/blobs/uploads/` then `PUT <Location>&digest=`), mount one from
//! another repository of the same registry (`POST ...?mount=&from=`), and put a manifest.
//!
//! Uploads go through the same [`Upstream::send_with`] as reads, so they get the auth handshake
//! (a registry asks for `push,pull` scope in the challenge of the `POST`, and the cached pull
//! token it replaces is simply the rejected answer), the status mapping and retries: a failed
//! upload is retried from a new upload session, with the file read again from its start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION};
use reqwest::{Body, Method, Response, Url};

use super::http::{DOCKER_CONTENT_DIGEST, Target, header_str};
use super::{BlobSource, Error, MAX_MANIFEST_BYTES, Upstream, check_digest, name};
use crate::Digest;

/// Told the bytes of one blob transfer moved so far; starts again from 0 when a retry does.
pub type OnProgress = Arc<dyn Fn(u64) + Send + Sync>;

/// What to upload as a blob's bytes.
#[derive(Clone)]
pub enum BlobBody {
    /// Small blobs (image configs) held in memory.
    Bytes(Bytes),
    /// A file streamed from disk (layers), reopened for every attempt.
    File {
        path: PathBuf,
        progress: Option<OnProgress>,
    },
}

impl std::fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobBody::Bytes(bytes) => write!(f, "Bytes({} bytes)", bytes.len()),
            BlobBody::File { path, .. } => write!(f, "File({})", path.display()),
        }
    }
}

/// Blob transfers may take this long on top of the per-request limit: at least 1 MiB/s.
const MIN_TRANSFER_RATE: u64 = 1 << 20;

impl Upstream {
    /// The per-request limit stretched for a `size`-byte body.
    pub(super) fn transfer_timeout(&self, size: u64) -> Duration {
        self.inner.request_timeout + Duration::from_secs(size / MIN_TRANSFER_RATE)
    }

    /// `HEAD /v2/<repo>/blobs/<digest>`: whether the repository already has the blob.
    pub async fn blob_exists(&self, src: &BlobSource, digest: &Digest) -> Result<bool, Error> {
        match self.blob_size(src, digest).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Asks the registry to mount `digest` from `from`, another repository of it: `true` if it
    /// did, `false` if it declined (the blob is not there, or mounts are off), in which case the
    /// caller uploads it with [`Upstream::push_blob`].
    pub async fn mount_blob(
        &self,
        src: &BlobSource,
        digest: &Digest,
        from: &str,
    ) -> Result<bool, Error> {
        src.validate()?;
        name::check_repository(from)?;
        let target = Target {
            src,
            what: format!("mount of blob {digest} from {from}"),
        };
        let url = self.url(src, &format!("blobs/uploads/?mount={digest}&from={from}"));
        let (target, url) = (&target, &url);
        self.retrying(|| async move {
            let response = self
                .send(target, &Method::POST, url, &HeaderMap::new())
                .await?;
            // A 202 opens an upload session that we leave for the registry to expire.
            Ok(response.status().as_u16() == 201)
        })
        .await
    }

    /// Uploads a `size`-byte blob that hashes to `digest` into `src`. The registry checks the
    /// digest and size; so does this call, before sending.
    pub async fn push_blob(
        &self,
        src: &BlobSource,
        digest: &Digest,
        size: u64,
        body: BlobBody,
    ) -> Result<(), Error> {
        src.validate()?;
        check_body(&body, digest, size)?;
        let target = Target {
            src,
            what: format!("upload of blob {digest}"),
        };
        let start = self.url(src, "blobs/uploads/");
        let (target, start, body) = (&target, &start, &body);
        self.retrying(|| async move {
            let session = self
                .send(target, &Method::POST, start, &HeaderMap::new())
                .await?;
            let location = upload_location(&session, start, target)?;
            let url = with_digest(location, digest);
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
            let make_body = || open_body(body, target).map(Some);
            let response = self
                .send_with(
                    target,
                    &Method::PUT,
                    url.as_str(),
                    &headers,
                    &make_body,
                    Some(self.transfer_timeout(size)),
                )
                .await?;
            match response.status().as_u16() {
                201 | 204 => {}
                status => return Err(target.bad(format!("HTTP {status} to the final PUT"))),
            }
            check_digest(&response, &digest.to_string(), target)?;
            Ok(())
        })
        .await
    }

    /// `PUT /v2/<repo>/manifests/<reference>` (a tag, or the body's own digest) with
    /// `Content-Type: media_type`; returns the manifest's digest.
    pub async fn push_manifest(
        &self,
        src: &BlobSource,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest, Error> {
        src.validate()?;
        name::check_reference(reference)?;
        let digest = Digest::of(&body);
        if body.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Error::InvalidInput {
                what: "manifest",
                value: format!("{digest} of {} bytes", body.len()),
                reason: "larger than the 4 MiB registries accept",
            });
        }
        if let Ok(named) = reference.parse::<Digest>()
            && named != digest
        {
            return Err(Error::InvalidInput {
                what: "manifest reference",
                value: reference.to_owned(),
                reason: "is not the digest of the manifest",
            });
        }
        let content_type = HeaderValue::try_from(media_type).map_err(|_| Error::InvalidInput {
            what: "manifest media type",
            value: media_type.chars().take(256).collect(),
            reason: "not a valid HTTP header value",
        })?;
        let target = Target {
            src,
            what: format!("manifest {reference}"),
        };
        let url = self.url(src, &format!("manifests/{reference}"));
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, content_type);
        let (target, url, headers, body) = (&target, &url, &headers, &body);
        self.retrying(|| async move {
            let make_body = || Ok(Some(Body::from(body.clone())));
            let response = self
                .send_with(target, &Method::PUT, url, headers, &make_body, None)
                .await?;
            if let Some(got) = header_str(&response, DOCKER_CONTENT_DIGEST)
                && got != digest.to_string()
            {
                return Err(target.bad(format!(
                    "stored the manifest as {got}, but its bytes hash to {digest}"
                )));
            }
            Ok(digest)
        })
        .await
    }
}

/// Refuses, before any request, a body that is not the blob the caller named.
fn check_body(body: &BlobBody, digest: &Digest, size: u64) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidInput {
        what: "blob body",
        value: format!("{body:?} for {digest} of {size} bytes"),
        reason,
    };
    match body {
        BlobBody::Bytes(bytes) if bytes.len() as u64 != size => Err(invalid("size differs")),
        BlobBody::Bytes(bytes) if Digest::of(bytes) != *digest => Err(invalid("digest differs")),
        BlobBody::Bytes(_) => Ok(()),
        BlobBody::File { path, .. } => {
            let len = std::fs::metadata(path)
                .map_err(|source| local(path, source))?
                .len();
            if len == size {
                Ok(())
            } else {
                Err(invalid("file size differs"))
            }
        }
    }
}

fn local(path: &Path, source: std::io::Error) -> Error {
    Error::LocalFile {
        path: path.to_owned(),
        source,
    }
}

/// A fresh request body: the bytes, or the file from its start, counting what is sent.
fn open_body(body: &BlobBody, target: &Target<'_>) -> Result<Body, Error> {
    let (path, progress) = match body {
        BlobBody::Bytes(bytes) => return Ok(Body::from(bytes.clone())),
        BlobBody::File { path, progress } => (path, progress.clone()),
    };
    let file = std::fs::File::open(path).map_err(|source| local(path, source))?;
    let mut sent = 0u64;
    let stream =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 256 << 10)
            .inspect_ok(move |chunk| {
                sent += chunk.len() as u64;
                if let Some(progress) = &progress {
                    progress(sent);
                }
            });
    tracing::debug!(path = %path.display(), what = %target.what, "streaming blob");
    Ok(Body::wrap_stream(stream))
}

/// The upload session URL of a `202 Accepted`: `Location`, absolute or relative to `start`.
fn upload_location(response: &Response, start: &str, target: &Target<'_>) -> Result<Url, Error> {
    let status = response.status().as_u16();
    if status != 202 {
        return Err(target.bad(format!("HTTP {status} to starting an upload, not 202")));
    }
    let location = header_str(response, LOCATION)
        .ok_or_else(|| target.bad("202 to starting an upload without a Location".into()))?;
    let base = Url::parse(start).map_err(|e| target.bad(format!("upload URL {start}: {e}")))?;
    let url = base
        .join(&location)
        .map_err(|e| target.bad(format!("Location {location:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(target.bad(format!("Location {location:?} is not an http(s) URL")));
    }
    // The upload carries the registry's credentials: never to another host.
    if (url.host_str(), url.port_or_known_default())
        != (base.host_str(), base.port_or_known_default())
    {
        return Err(target.bad(format!(
            "Location {location:?} is on another host than the registry; not sending its credentials there"
        )));
    }
    Ok(url)
}

/// Adds `digest=` to the session URL, keeping the registry's own query (`_state=`, ...).
fn with_digest(mut url: Url, digest: &Digest) -> Url {
    url.query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_added_to_the_session_query() -> anyhow::Result<()> {
        let digest = Digest::of(b"x");
        let url = with_digest(
            Url::parse("http://r:5000/v2/a/blobs/uploads/u?_state=abc%3D")?,
            &digest,
        );
        assert_eq!(
            url.as_str(),
            format!(
                "http://r:5000/v2/a/blobs/uploads/u?_state=abc%3D&digest=sha256%3A{}",
                digest.hex()
            )
        );
        let url = with_digest(Url::parse("http://r/up")?, &digest);
        assert_eq!(
            url.query(),
            Some(format!("digest=sha256%3A{}", digest.hex()).as_str())
        );
        Ok(())
    }

    #[test]
    fn an_upload_is_never_sent_to_another_host() -> anyhow::Result<()> {
        let src = BlobSource::new("r:5000", "a");
        let target = Target {
            src: &src,
            what: "blob upload".into(),
        };
        let start = "http://r:5000/v2/a/blobs/uploads/";
        let answer = |location: &str| -> anyhow::Result<Response> {
            Ok(Response::from(
                axum::http::Response::builder()
                    .status(202)
                    .header(LOCATION, location)
                    .body(Vec::<u8>::new())?,
            ))
        };
        let same = upload_location(&answer("/v2/a/blobs/uploads/u1")?, start, &target)?;
        assert_eq!(same.as_str(), "http://r:5000/v2/a/blobs/uploads/u1");
        assert!(upload_location(&answer("http://elsewhere:5000/u1")?, start, &target).is_err());
        assert!(upload_location(&answer("http://r:6000/u1")?, start, &target).is_err());
        Ok(())
    }
}
