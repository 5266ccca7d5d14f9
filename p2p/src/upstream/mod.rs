//! The upstream OCI registry: where a blob's bytes come from when nobody in the swarm has them,
//! and where the node's registry mirror gets manifests.
//!
//! [`Upstream`] speaks the read side of the OCI distribution API (`HEAD` a blob for its size,
//! `GET` byte ranges of it, `HEAD`/`GET` manifests) to any registry containerd names, with the
//! auth handshake of `docker login` registries, retries for transient failures, and bounds on
//! every body it reads. Piece verification is the caller's job: this module only promises the
//! number of bytes, not their hash (manifests fetched by digest are the exception, see
//! [`Upstream::manifest`]).
//!
//! The write side (`push.rs`: blob uploads and mounts, manifest PUTs) and whole-blob downloads
//! into a file (`download.rs`) serve `shoal convert`.
//!
//! Layout: `http.rs` sends one request (URL, auth, status mapping, retries), `auth.rs` answers
//! the `WWW-Authenticate` challenges that `challenge.rs` parses and caches tokens,
//! `credentials.rs` reads docker `config.json`, `name.rs` checks names before they reach a URL,
//! `config.rs` is the `[registry]` section, `error.rs` the error kinds; `tests/` runs the client
//! against in-process HTTP servers.

mod auth;
mod challenge;
mod config;
mod credentials;
mod download;
mod error;
mod http;
mod name;
mod push;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use reqwest::Method;
use reqwest::header::{ACCEPT, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderValue, RANGE};
use serde::{Deserialize, Serialize};

use self::auth::Auth;
pub use self::config::RegistryConfig;
use self::credentials::Credentials;
pub use self::error::Error;
use self::http::{
    DOCKER_CONTENT_DIGEST, Target, content_length, header_str, read_capped, read_exact_into,
};
pub use self::push::{BlobBody, OnProgress};
use crate::Digest;

/// Manifests are small JSON documents; distribution itself refuses to store more than 4 MiB.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Sent when the caller names no media types, so the registry does not fall back to schema 1.
const DEFAULT_MANIFEST_ACCEPT: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Where a blob lives upstream: the registry as containerd names it in `?ns=` (`docker.io`,
/// `127.0.0.1:5000`) and the repository within it (`library/busybox`, already with `library/`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobSource {
    pub registry: String,
    pub repository: String,
}

impl BlobSource {
    pub fn new(registry: impl Into<String>, repository: impl Into<String>) -> Self {
        Self {
            registry: registry.into(),
            repository: repository.into(),
        }
    }

    /// Checks both names against the distribution grammar; every request does this first.
    pub fn validate(&self) -> Result<(), Error> {
        name::check_registry(&self.registry)?;
        name::check_repository(&self.repository)
    }
}

impl fmt::Display for BlobSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)
    }
}

/// Where [`Upstream::fetch_range_into`] puts a range's bytes as they arrive, so that a large
/// range need not be held in memory (the swarm writes pieces straight into the store).
pub trait RangeSink: Send {
    /// Forgets what was written: the range is being sent again from its first byte (a retry).
    fn restart(&mut self);
    /// Takes the next bytes of the range. An error ends the transfer and is not retried.
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// The sink of [`Upstream::fetch_range`]: the whole range in memory (its length, reserved at
/// the first write).
struct Memory(BytesMut, usize);

impl RangeSink for Memory {
    fn restart(&mut self) {
        self.0.clear();
    }

    fn write(&mut self, chunk: Bytes) -> impl Future<Output = std::io::Result<()>> + Send {
        if self.0.capacity() == 0 {
            self.0.reserve(self.1);
        }
        self.0.extend_from_slice(&chunk);
        std::future::ready(Ok(()))
    }
}

/// A registry's answer to a manifest request, for the mirror to pass on to containerd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub docker_content_digest: Option<String>,
    /// As the registry announced it (for a GET without one, the body's length).
    pub content_length: Option<u64>,
    /// Empty for a HEAD.
    pub body: Bytes,
}

/// A client for upstream registries; cheap to clone, shares connections and auth tokens.
#[derive(Clone, Debug)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: reqwest::Client,
    auth: Auth,
    insecure: HashSet<String>,
    retries: u32,
    request_timeout: std::time::Duration,
}

impl Upstream {
    /// Builds the client and reads the docker config's credentials.
    pub fn new(cfg: &RegistryConfig) -> Result<Self, Error> {
        cfg.validate().map_err(Error::Config)?;
        let credentials = Credentials::load(cfg.docker_config.as_deref())?;
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout())
            .timeout(cfg.request_timeout())
            .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::Client)?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                auth: Auth::new(credentials),
                insecure: cfg.insecure.iter().cloned().collect(),
                retries: cfg.retries,
                request_timeout: cfg.request_timeout(),
            }),
        })
    }

    /// `HEAD /v2/<repo>/blobs/<digest>`: the blob's size.
    pub async fn blob_size(&self, src: &BlobSource, digest: &Digest) -> Result<u64, Error> {
        src.validate()?;
        let target = Target {
            src,
            what: format!("blob {digest}"),
        };
        let url = self.url(src, &format!("blobs/{digest}"));
        let (target, url, headers) = (&target, &url, &HeaderMap::new());
        self.retrying(|| async move {
            let response = self.send(target, &Method::HEAD, url, headers).await?;
            check_digest(&response, &digest.to_string(), target)?;
            content_length(&response)
                .ok_or_else(|| target.bad("HEAD answer without Content-Length".into()))
        })
        .await
    }

    /// `GET` with `Range: bytes=start-(end-1)`: exactly `range.end - range.start` bytes, in
    /// memory (see [`Upstream::fetch_range_into`] for ranges too large for that).
    pub async fn fetch_range(
        &self,
        src: &BlobSource,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, Error> {
        let len = usize::try_from(range.end.saturating_sub(range.start)).map_err(|_| {
            Error::InvalidInput {
                what: "byte range",
                value: format!("{range:?} of {digest}"),
                reason: "longer than this machine can hold in memory",
            }
        })?;
        let mut body = Memory(BytesMut::new(), len);
        self.fetch_range_into(src, digest, range, &mut body).await?;
        Ok(body.0.freeze())
    }

    /// `GET` with `Range: bytes=start-(end-1)`, handing the body to `sink` as it arrives: exactly
    /// `range.end - range.start` bytes, or an error. A retry (after a broken transfer, say)
    /// restarts the sink and sends the range again.
    ///
    /// A server that ignores `Range` and answers with the whole blob is an error
    /// ([`Error::RangeIgnored`]) found from the headers alone, unless the range is the whole blob.
    pub async fn fetch_range_into(
        &self,
        src: &BlobSource,
        digest: &Digest,
        range: Range<u64>,
        sink: &mut impl RangeSink,
    ) -> Result<(), Error> {
        src.validate()?;
        let invalid = |reason| Error::InvalidInput {
            what: "byte range",
            value: format!("{range:?} of {digest}"),
            reason,
        };
        if range.start > range.end {
            return Err(invalid("start is after end"));
        }
        if range.is_empty() {
            return Ok(());
        }
        let last = range.end - 1;
        let target = Target {
            src,
            what: format!("blob {digest} bytes {}-{last}", range.start),
        };
        let url = self.url(src, &format!("blobs/{digest}"));
        let mut headers = HeaderMap::new();
        let value = format!("bytes={}-{last}", range.start);
        headers.insert(
            RANGE,
            HeaderValue::try_from(value).map_err(|_| invalid("not a header"))?,
        );
        // Not `retrying`: each attempt needs the sink, which only one future may borrow.
        let mut attempt = 0;
        loop {
            sink.restart();
            match self.read_range(&target, &url, &headers, &range, sink).await {
                Err(e) if self.retry_after(&e, &mut attempt).await => {}
                result => return result,
            }
        }
    }

    /// One attempt of [`Upstream::fetch_range_into`].
    async fn read_range(
        &self,
        target: &Target<'_>,
        url: &str,
        headers: &HeaderMap,
        range: &Range<u64>,
        sink: &mut impl RangeSink,
    ) -> Result<(), Error> {
        let (len, last) = (range.end - range.start, range.end - 1);
        let response = self.send(target, &Method::GET, url, headers).await?;
        let status = response.status().as_u16();
        let announced = content_length(&response);
        match status {
            206 => check_content_range(&response, range.start, last, target)?,
            // The whole blob is acceptable when it is exactly the range asked for.
            200 if range.start == 0 && announced == Some(len) => {}
            200 => return Err(target.range_ignored(status, announced)),
            _ => return Err(target.bad(format!("HTTP {status} to a range request"))),
        }
        if let Some(n) = announced
            && n != len
        {
            return Err(target.bad(format!("Content-Length {n} for a {len}-byte range")));
        }
        read_exact_into(response, len, sink, target).await
    }

    /// `HEAD` or `GET /v2/<repo>/manifests/<reference>` with the caller's `Accept` media types
    /// (a default list of OCI and Docker v2 types if empty). A GET by digest is checked against
    /// that digest; bodies over 4 MiB are refused.
    pub async fn manifest(
        &self,
        src: &BlobSource,
        reference: &str,
        accept: &[String],
        head: bool,
    ) -> Result<ManifestResponse, Error> {
        src.validate()?;
        name::check_reference(reference)?;
        let mut headers = HeaderMap::new();
        let defaults = DEFAULT_MANIFEST_ACCEPT.map(String::from);
        for media_type in if accept.is_empty() {
            &defaults[..]
        } else {
            accept
        } {
            let value =
                HeaderValue::try_from(media_type.as_str()).map_err(|_| Error::InvalidInput {
                    what: "Accept media type",
                    value: media_type.chars().take(256).collect(),
                    reason: "not a valid HTTP header value",
                })?;
            headers.append(ACCEPT, value);
        }
        let target = Target {
            src,
            what: format!("manifest {reference}"),
        };
        let url = self.url(src, &format!("manifests/{reference}"));
        let method = if head { Method::HEAD } else { Method::GET };
        let by_digest = reference.parse::<Digest>().ok();

        let (target, url, headers, method) = (&target, &url, &headers, &method);
        self.retrying(|| async move {
            let response = self.send(target, method, url, headers).await?;
            let status = response.status().as_u16();
            let content_type = header_str(&response, CONTENT_TYPE);
            let docker_content_digest = header_str(&response, DOCKER_CONTENT_DIGEST);
            let announced = content_length(&response);
            if let Some(digest) = by_digest {
                check_digest(&response, &digest.to_string(), target)?;
            }
            let body = if head {
                Bytes::new()
            } else {
                read_capped(response, MAX_MANIFEST_BYTES, target).await?
            };
            // Only a manifest is checked: a 404's body is an error document.
            if let Some(expected) = by_digest
                && !head
                && (200..300).contains(&status)
                && Digest::of(&body) != expected
            {
                return Err(target.bad(format!("body hashes to {}", Digest::of(&body))));
            }
            Ok(ManifestResponse {
                status,
                content_type,
                docker_content_digest,
                content_length: announced.or((!head).then_some(body.len() as u64)),
                body,
            })
        })
        .await
    }
}

/// A `Docker-Content-Digest` that names another object means the registry answered for
/// something else; its absence is fine (many servers omit it).
fn check_digest(
    response: &reqwest::Response,
    expected: &str,
    target: &Target<'_>,
) -> Result<(), Error> {
    match header_str(response, DOCKER_CONTENT_DIGEST) {
        Some(got) if got != expected => {
            Err(target.bad(format!("Docker-Content-Digest is {got}, not {expected}")))
        }
        _ => Ok(()),
    }
}

/// A 206 must cover exactly `first..=last`; servers may clip a range at the blob's end.
fn check_content_range(
    response: &reqwest::Response,
    first: u64,
    last: u64,
    target: &Target<'_>,
) -> Result<(), Error> {
    let Some(value) = header_str(response, CONTENT_RANGE) else {
        return Ok(()); // The length checks still hold the server to the range.
    };
    let span = value
        .strip_prefix("bytes ")
        .and_then(|rest| rest.split_once('/'))
        .map(|(span, _)| span);
    let parsed = span
        .and_then(|span| span.split_once('-'))
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)));
    if parsed != Some((first, last)) {
        return Err(target.bad(format!("Content-Range {value:?} for bytes {first}-{last}")));
    }
    Ok(())
}
