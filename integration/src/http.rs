//! A blocking HTTP GET for the harness's own checks (is the registry up, what manifest did it
//! store), usable from plain and from `#[tokio::test]` functions alike.
//!
//! `reqwest::blocking` panics when created or dropped inside a tokio runtime, which is where an
//! async test would call the harness from; running each request on a fresh OS thread keeps the
//! harness synchronous without that trap.

use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

/// What the harness needs from a response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The `Docker-Content-Digest` header, if the server sent one.
    pub content_digest: Option<String>,
    pub body: Vec<u8>,
}

/// GETs `url` with an optional `Accept` header, without following redirects.
pub fn get(url: &str, accept: Option<&str>, timeout: Duration) -> Result<Response> {
    thread::scope(|s| {
        s.spawn(|| get_on_this_thread(url, accept, timeout))
            .join()
            .map_err(|_| anyhow!("the thread fetching {url} panicked"))?
    })
}

fn get_on_this_thread(url: &str, accept: Option<&str>, timeout: Duration) -> Result<Response> {
    let client = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building an HTTP client")?;
    let mut request = client.get(url);
    if let Some(accept) = accept {
        request = request.header(reqwest::header::ACCEPT, accept);
    }
    let response = request.send().with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    let content_digest = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .bytes()
        .with_context(|| format!("reading the body of GET {url}"))?
        .to_vec();
    Ok(Response {
        status,
        content_digest,
        body,
    })
}

/// GETs `url` and returns its body as text, failing on a non-2xx status.
pub fn get_text(url: &str) -> Result<String> {
    let resp = get(url, None, Duration::from_secs(10))?;
    if !(200..300).contains(&resp.status) {
        return Err(anyhow!("GET {url}: HTTP {}", resp.status));
    }
    String::from_utf8(resp.body).with_context(|| format!("GET {url}: body is not UTF-8"))
}

/// PUTs `body` to `url` with `content_type`, failing on a non-2xx status (pushing a manifest).
pub fn put(url: &str, content_type: &str, body: Vec<u8>) -> Result<()> {
    thread::scope(|s| {
        s.spawn(|| {
            let response = reqwest::blocking::Client::new()
                .put(url)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body)
                .send()
                .with_context(|| format!("PUT {url}"))?;
            let status = response.status();
            if !status.is_success() {
                let text = response.text().unwrap_or_default();
                return Err(anyhow!("PUT {url}: HTTP {status}: {text}"));
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow!("the thread putting {url} panicked"))?
    })
}
