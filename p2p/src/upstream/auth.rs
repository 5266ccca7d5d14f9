//! The registry auth handshake (distribution token auth, or plain basic auth) and its cache.
//!
//! Requests first go out with whatever `Authorization` is cached for their repository, or none. A
//! 401 carries `WWW-Authenticate` challenges: for `Bearer`, a token is fetched from the challenge's
//! realm (sending the docker config login, if any, as basic auth) and cached per (registry,
//! repository) until shortly before its `expires_in`; for `Basic`, the login itself is used.
//! `http.rs` then repeats the request once. Concurrent requests to one repository wait for a
//! single token fetch instead of each fetching their own.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use reqwest::header::HeaderValue;
use serde::Deserialize;

use super::challenge::Challenge;
use super::credentials::Credentials;
use super::http::{Target, read_capped};
use super::{BlobSource, Error};

/// Repositories whose auth is remembered; more are re-negotiated on their next 401.
const CACHED_REPOSITORIES: NonZeroUsize = NonZeroUsize::new(1024).expect("non-zero");
/// Token responses are a few KiB; anything far larger is not a token.
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;
/// `expires_in` when the token server does not say (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: u64 = 60;

/// Answers auth challenges and remembers the answers.
#[derive(Debug)]
pub(super) struct Auth {
    credentials: Credentials,
    slots: Mutex<LruCache<(String, String), Arc<Slot>>>,
}

/// One repository's auth, behind an async lock so that one task at a time renews it.
#[derive(Debug, Default)]
struct Slot(tokio::sync::Mutex<Option<Cached>>);

struct Cached {
    header: HeaderValue,
    /// `None` for basic auth, which does not expire.
    expires: Option<Instant>,
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl Cached {
    fn fresh(&self) -> Option<&HeaderValue> {
        match self.expires {
            Some(at) if at <= Instant::now() => None,
            _ => Some(&self.header),
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Auth {
    pub fn new(credentials: Credentials) -> Self {
        Self {
            credentials,
            slots: Mutex::new(LruCache::new(CACHED_REPOSITORIES)),
        }
    }

    fn slot(&self, src: &BlobSource) -> Arc<Slot> {
        let key = (src.registry.clone(), src.repository.clone());
        // A poisoned lock only means another thread panicked mid-update of an LRU of Arcs.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get_or_insert(key, Default::default).clone()
    }

    /// The `Authorization` to send first; waits if another task is renewing it.
    pub async fn current(&self, src: &BlobSource) -> Option<HeaderValue> {
        let slot = self.slot(src);
        let cached = slot.0.lock().await;
        cached.as_ref().and_then(Cached::fresh).cloned()
    }

    /// Answers the challenges of a 401 to a request sent with `rejected` (or anonymously).
    pub async fn answer(
        &self,
        client: &reqwest::Client,
        target: &Target<'_>,
        challenges: &[Challenge],
        rejected: Option<&HeaderValue>,
    ) -> Result<HeaderValue, Error> {
        let slot = self.slot(target.src);
        let mut cached = slot.0.lock().await;
        // Renewed by another task while this one waited.
        if let Some(header) = cached.as_ref().and_then(Cached::fresh)
            && Some(header) != rejected
        {
            return Ok(header.clone());
        }
        let bearer = challenges.iter().find(|c| c.scheme == "bearer");
        let basic = challenges.iter().find(|c| c.scheme == "basic");
        let login = self.credentials.get(&target.src.registry);
        let fresh = match (bearer, basic, login) {
            (Some(bearer), _, _) => self.fetch_token(client, target, bearer).await?,
            (None, Some(_), Some(login)) => Cached {
                header: sensitive(&login.basic_header(), target)?,
                expires: None,
            },
            (None, Some(_), None) => return Err(target.unauthorized()),
            (None, None, _) if challenges.is_empty() => return Err(target.unauthorized()),
            (None, None, _) => {
                let schemes: Vec<_> = challenges.iter().map(|c| c.scheme.as_str()).collect();
                return Err(target.bad(format!(
                    "401 without a Bearer or Basic challenge (schemes offered: {schemes:?})"
                )));
            }
        };
        if Some(&fresh.header) == rejected {
            // The registry just refused this very answer.
            return Err(target.unauthorized());
        }
        let header = fresh.header.clone();
        *cached = Some(fresh);
        Ok(header)
    }

    async fn fetch_token(
        &self,
        client: &reqwest::Client,
        target: &Target<'_>,
        challenge: &Challenge,
    ) -> Result<Cached, Error> {
        let realm = challenge
            .param("realm")
            .ok_or_else(|| target.bad("Bearer challenge without a realm".into()))?;
        let url = reqwest::Url::parse(realm)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| target.bad(format!("Bearer realm {realm:?} is not an http(s) URL")))?;
        let token_target = Target {
            src: target.src,
            what: format!("a token for {} from {realm}", target.what),
        };
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = challenge.param("service") {
            query.push(("service", service));
        }
        let default_scope = format!("repository:{}:pull", target.src.repository);
        let scopes = challenge.param("scope").unwrap_or(&default_scope);
        query.extend(scopes.split_whitespace().map(|scope| ("scope", scope)));

        let mut request = client.get(url).query(&query);
        if let Some(login) = self.credentials.get(&target.src.registry) {
            request = request.basic_auth(&login.username, Some(&login.password));
        }
        let response = request.send().await.map_err(|e| token_target.request(e))?;
        match response.status().as_u16() {
            200..=299 => {}
            401 | 403 => return Err(target.unauthorized()),
            status => return Err(token_target.status(status)),
        }
        let body = read_capped(response, MAX_TOKEN_RESPONSE, &token_target).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| token_target.bad(format!("token response is not JSON: {e}")))?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| token_target.bad("token response has no token".into()))?;
        // Renew a little early so a request does not race the expiry.
        let lifetime = parsed.expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME) * 9 / 10;
        Ok(Cached {
            header: sensitive(&format!("Bearer {token}"), &token_target)?,
            expires: Some(Instant::now() + Duration::from_secs(lifetime)),
        })
    }
}

fn sensitive(value: &str, target: &Target<'_>) -> Result<HeaderValue, Error> {
    let mut header = HeaderValue::from_str(value)
        .map_err(|_| target.bad("credentials are not a valid HTTP header value".into()))?;
    header.set_sensitive(true);
    Ok(header)
}
