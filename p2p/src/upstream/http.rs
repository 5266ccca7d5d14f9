//! One registry request as the rest of `upstream` sees it: the URL for a registry name, the auth
//! handshake on 401, statuses turned into typed errors, body reads bounded before allocating, and
//! retries with jittered exponential backoff for failures that may pass.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Body, Method, Response};

use super::challenge::parse_challenges;
use super::{BlobSource, Error, RangeSink, Upstream};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Docker Hub is named `docker.io` by containerd but served from this host.
const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";

/// What one call asks for, so that every error it returns can say so.
#[derive(Debug)]
pub(super) struct Target<'a> {
    pub src: &'a BlobSource,
    /// `blob sha256:…`, `manifest latest`: the object, for messages.
    pub what: String,
}

impl Target<'_> {
    pub fn unauthorized(&self) -> Error {
        Error::Unauthorized {
            registry: self.src.registry.clone(),
            repository: self.src.repository.clone(),
            what: self.what.clone(),
        }
    }

    pub fn not_found(&self) -> Error {
        Error::NotFound {
            registry: self.src.registry.clone(),
            repository: self.src.repository.clone(),
            what: self.what.clone(),
        }
    }

    pub fn status(&self, status: u16) -> Error {
        Error::Status {
            registry: self.src.registry.clone(),
            repository: self.src.repository.clone(),
            what: self.what.clone(),
            status,
        }
    }

    pub fn request(&self, source: reqwest::Error) -> Error {
        Error::Request {
            registry: self.src.registry.clone(),
            repository: self.src.repository.clone(),
            what: self.what.clone(),
            source,
        }
    }

    pub fn range_ignored(&self, status: u16, content_length: Option<u64>) -> Error {
        Error::RangeIgnored {
            registry: self.src.registry.clone(),
            repository: self.src.repository.clone(),
            what: self.what.clone(),
            status,
            content_length,
        }
    }

    pub fn too_large(&self, limit: u64) -> Error {
        Error::TooLarge {
            registry: self.src.registry.clone(),
            repository: self.src.repository.clone(),
            what: self.what.clone(),
            limit,
        }
    }

    pub fn sink(&self, source: std::io::Error) -> Error {
        Error::Sink {
            registry: self.src.registry.clone(),
            repository: self.src.repository.clone(),
            what: self.what.clone(),
            source,
        }
    }

    pub fn bad(&self, reason: String) -> Error {
        Error::BadResponse {
            registry: self.src.registry.clone(),
            repository: self.src.repository.clone(),
            what: self.what.clone(),
            reason,
        }
    }
}

impl Upstream {
    /// `<scheme>://<host>/v2/<repository>/<rest>`; names were checked before.
    pub(super) fn url(&self, src: &BlobSource, rest: &str) -> String {
        let scheme = if self.inner.insecure.contains(&src.registry) {
            "http"
        } else {
            "https"
        };
        let host = match src.registry.as_str() {
            "docker.io" => DOCKER_HUB_REGISTRY,
            other => other,
        };
        format!("{scheme}://{host}/v2/{}/{rest}", src.repository)
    }

    /// Sends one request, answering a 401 once; returns only 2xx responses.
    pub(super) async fn send(
        &self,
        target: &Target<'_>,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
    ) -> Result<Response, Error> {
        self.send_with(target, method, url, headers, &|| Ok(None), None)
            .await
    }

    /// [`Upstream::send`] with a request body and a time limit of its own (blob transfers
    /// outlast the client's per-request default). `body` makes a fresh body for each attempt,
    /// since a streamed one is spent by the request that the registry answers with a 401.
    pub(super) async fn send_with(
        &self,
        target: &Target<'_>,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        body: &(dyn Fn() -> Result<Option<Body>, Error> + Sync),
        timeout: Option<Duration>,
    ) -> Result<Response, Error> {
        let inner = &self.inner;
        let mut authorization = inner.auth.current(target.src).await;
        let mut answered = false;
        loop {
            let mut request = inner
                .client
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(value) = &authorization {
                request = request.header(AUTHORIZATION, value.clone());
            }
            if let Some(body) = body()? {
                request = request.body(body);
            }
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            let response = request.send().await.map_err(|e| target.request(e))?;
            let status = response.status().as_u16();
            match status {
                200..=299 => return Ok(response),
                401 if !answered => {
                    let challenges: Vec<_> = response
                        .headers()
                        .get_all(WWW_AUTHENTICATE)
                        .iter()
                        .flat_map(|v| parse_challenges(&String::from_utf8_lossy(v.as_bytes())))
                        .collect();
                    let answer = inner
                        .auth
                        .answer(&inner.client, target, &challenges, authorization.as_ref())
                        .await?;
                    authorization = Some(answer);
                    answered = true;
                }
                401 => return Err(target.unauthorized()),
                404 => return Err(target.not_found()),
                _ => return Err(target.status(status)),
            }
        }
    }

    /// Runs `op` until it succeeds, fails for good, or has been retried `retries` times.
    ///
    /// `op` is a closure returning a future rather than an async closure: futures of async
    /// closures are not yet provably `Send`, and callers spawn these calls on tokio tasks.
    pub(super) async fn retrying<T, Fut>(&self, mut op: impl FnMut() -> Fut) -> Result<T, Error>
    where
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if self.retry_after(&e, &mut attempt).await => {}
                result => return result,
            }
        }
    }

    /// Whether to try again after `e` (transient, and retries left); if so, waits the backoff
    /// first and counts the attempt.
    pub(super) async fn retry_after(&self, e: &Error, attempt: &mut u32) -> bool {
        if !e.is_retryable() || *attempt >= self.inner.retries {
            return false;
        }
        let delay = backoff(*attempt);
        *attempt += 1;
        tracing::debug!(error = %e, attempt, ?delay, "retrying upstream request");
        tokio::time::sleep(delay).await;
        true
    }
}

/// 100 ms doubling up to 2 s, each delay drawn from its upper half so that the many nodes of a
/// swarm hit by one registry outage do not retry in lockstep.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_START
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_MAX);
    ceiling.mul_f64(rand::random_range(0.5..=1.0))
}

/// A header as text, if present and printable.
pub(super) fn header_str(
    response: &Response,
    name: impl reqwest::header::AsHeaderName,
) -> Option<String> {
    Some(response.headers().get(name)?.to_str().ok()?.to_owned())
}

/// `Content-Length` from the header itself: reqwest's `content_length()` is the body's size, which
/// is 0 for a HEAD.
pub(super) fn content_length(response: &Response) -> Option<u64> {
    header_str(response, CONTENT_LENGTH)?.trim().parse().ok()
}

pub(super) const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Reads a body of at most `limit` bytes, refusing by `Content-Length` before reading if it says
/// more.
pub(super) async fn read_capped(
    mut response: Response,
    limit: u64,
    target: &Target<'_>,
) -> Result<Bytes, Error> {
    let announced = content_length(&response);
    if announced.is_some_and(|n| n > limit) {
        return Err(target.too_large(limit));
    }
    let mut body = BytesMut::with_capacity(usize::try_from(announced.unwrap_or(0)).unwrap_or(0));
    while let Some(chunk) = response.chunk().await.map_err(|e| target.request(e))? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(target.too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Hands exactly `len` bytes of body to `sink`: more is a protocol error, fewer a broken
/// transfer.
pub(super) async fn read_exact_into(
    mut response: Response,
    len: u64,
    sink: &mut impl RangeSink,
    target: &Target<'_>,
) -> Result<(), Error> {
    let mut got = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(|e| target.request(e))? {
        if chunk.len() as u64 > len - got {
            return Err(target.bad(format!("more than the {len} bytes asked for")));
        }
        got += chunk.len() as u64;
        sink.write(chunk).await.map_err(|e| target.sink(e))?;
    }
    if got != len {
        return Err(Error::ShortBody {
            registry: target.src.registry.clone(),
            repository: target.src.repository.clone(),
            what: target.what.clone(),
            expected: len,
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        for (attempt, ceiling_ms) in [
            (0, 100),
            (1, 200),
            (3, 800),
            (4, 1600),
            (5, 2000),
            (40, 2000),
        ] {
            let delay = backoff(attempt);
            let ceiling = Duration::from_millis(ceiling_ms);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "attempt {attempt}: {delay:?}"
            );
        }
    }
}
