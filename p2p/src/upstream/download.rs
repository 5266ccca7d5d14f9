//! A whole blob streamed into a local file and checked against its digest: how `shoal convert`
//! reads layers, which may be far larger than memory and need no piece bookkeeping.

use std::path::Path;

use reqwest::Method;
use reqwest::header::HeaderMap;
use tokio::io::AsyncWriteExt;

use super::http::{Target, content_length};
use super::push::OnProgress;
use super::{BlobSource, Error, Upstream, check_digest};
use crate::Digest;
use crate::digest::Hasher;

impl Upstream {
    /// `GET /v2/<repo>/blobs/<digest>` into `path` (created or truncated); returns the size.
    ///
    /// The file holds the blob only if this returns `Ok`: the bytes are hashed as they arrive and
    /// a body that does not hash to `digest` (or is shorter than announced) is an error. A retry
    /// starts the file over.
    pub async fn fetch_blob_to(
        &self,
        src: &BlobSource,
        digest: &Digest,
        path: &Path,
        progress: Option<OnProgress>,
    ) -> Result<u64, Error> {
        src.validate()?;
        let target = Target {
            src,
            what: format!("blob {digest}"),
        };
        let url = self.url(src, &format!("blobs/{digest}"));
        let (target, url, progress) = (&target, &url, &progress);
        self.retrying(|| async move {
            let local = |source| Error::LocalFile {
                path: path.to_owned(),
                source,
            };
            let mut file = tokio::fs::File::create(path).await.map_err(local)?;
            // The size is not known before the headers; the limit grows with what they announce.
            let head = self
                .send(target, &Method::HEAD, url, &HeaderMap::new())
                .await?;
            let announced = content_length(&head);
            let timeout = self.transfer_timeout(announced.unwrap_or(0));
            let mut response = self
                .send_with(
                    target,
                    &Method::GET,
                    url,
                    &HeaderMap::new(),
                    &|| Ok(None),
                    Some(timeout),
                )
                .await?;
            check_digest(&response, &digest.to_string(), target)?;
            let announced = content_length(&response).or(announced);
            let mut hasher = Hasher::new();
            let mut written = 0u64;
            while let Some(chunk) = response.chunk().await.map_err(|e| target.request(e))? {
                if announced.is_some_and(|n| written + chunk.len() as u64 > n) {
                    return Err(target.bad(format!("more than the {announced:?} bytes announced")));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(local)?;
                written += chunk.len() as u64;
                if let Some(progress) = progress {
                    progress(written);
                }
            }
            if let Some(expected) = announced
                && written != expected
            {
                return Err(Error::ShortBody {
                    registry: src.registry.clone(),
                    repository: src.repository.clone(),
                    what: target.what.clone(),
                    expected,
                    got: written,
                });
            }
            let got = hasher.finish();
            if got != *digest {
                return Err(target.bad(format!("the {written}-byte body hashes to {got}")));
            }
            file.sync_all().await.map_err(local)?;
            Ok(written)
        })
        .await
    }
}
