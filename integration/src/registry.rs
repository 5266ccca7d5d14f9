//! A real upstream registry (`docker-registry`, distribution 2.8) for end-to-end tests.
//!
//! Shoal's promise is that the registry serves each blob about once however many nodes pull
//! it, so besides starting and stopping the registry this module reads its request log:
//! [`Registry::blob_bytes_served`] adds up the bytes the registry wrote for GETs of one blob.
//!
//! The registry is configured to log one JSON object per line (logrus' JSON formatter). Each
//! finished request produces a line with `"msg": "response completed"` (or `"response completed
//! with error"`) and the fields `http.request.method`, `http.request.uri`,
//! `http.response.status` and `http.response.written` (checked on 2.8.2+ds1). The Apache-style
//! access log is disabled so that the log holds only these lines.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::http;
use crate::proc::{self, Child};

/// How long the registry may take to answer `GET /v2/` after being started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request's log line may lag behind its response (see [`Registry::requests`]).
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A `docker-registry` on 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    child: Option<Child>,
    /// Makes each log barrier request unique.
    barriers: AtomicU64,
}

/// One finished request, as the registry logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Path and query, e.g. `/v2/test/blobs/sha256:...?ns=127.0.0.1:5000`.
    pub uri: String,
    pub status: u16,
    /// Body bytes written; less than the blob's size when the client went away mid-transfer.
    pub written: u64,
}

impl LoggedRequest {
    /// The URI without its query string.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    /// Whether this was a successful GET of `/v2/<repo>/blobs/<digest>` (full or ranged).
    pub fn is_blob_get(&self, digest: &str) -> bool {
        let path = self.path();
        self.method == "GET"
            && (200..300).contains(&self.status)
            && path.starts_with("/v2/")
            && path
                .strip_suffix(digest)
                .is_some_and(|p| p.ends_with("/blobs/"))
    }
}

impl Registry {
    /// Starts a registry on a free port with its storage, config and log under `dir`, and
    /// waits until `GET /v2/` answers.
    pub fn start(dir: &Path) -> Result<Registry> {
        let port = proc::free_port()?;
        let data = dir.join("data");
        fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let config = dir.join("registry.yml");
        fs::write(&config, config_yaml(&data, port))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut registry = Registry {
            dir: dir.to_owned(),
            config,
            port,
            child: None,
            barriers: AtomicU64::new(0),
        };
        registry.spawn()?;
        Ok(registry)
    }

    /// `127.0.0.1:PORT`: the host part of image references, and the hosts.toml directory name.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Everything the registry logged, over all its restarts.
    pub fn log(&self) -> String {
        proc::read_log(&self.log_path())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// Whether the registry process is up (it may still be starting).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(Child::is_running)
    }

    /// Stops the registry (for tests of an unreachable upstream); its storage stays.
    pub fn stop(&mut self) {
        if let Some(Err(e)) = self.child.take().map(|mut child| child.stop()) {
            eprintln!("stopping the registry: {e:#}");
        }
    }

    /// Stops the registry if it runs, then starts it again on the same port and storage.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// Every request the registry has finished so far, in log order.
    ///
    /// A response can reach the client a moment before its log line is written, so while the
    /// registry runs this first sends a marker request and waits for its line: requests that
    /// finished before the call are then in the log.
    pub fn requests(&self) -> Result<Vec<LoggedRequest>> {
        if self.child.is_some() {
            self.flush_log()?;
        }
        Ok(parse_log(&self.log()))
    }

    /// Total body bytes the registry wrote in successful responses to `GET
    /// /v2/<any repo>/blobs/<digest>` (full and ranged), across restarts. Requests still in
    /// flight are not counted.
    pub fn blob_bytes_served(&self, digest: &str) -> Result<u64> {
        Ok(self
            .requests()?
            .iter()
            .filter(|r| r.is_blob_get(digest))
            .map(|r| r.written)
            .sum())
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&self.config);
        let mut child = Child::spawn("registry", cmd, &self.dir)?;
        let url = format!("{}/v2/", self.url());
        proc::wait_until(START_TIMEOUT, &format!("the registry at {url}"), || {
            child.ensure_running()?;
            Ok(http::get(&url, None, Duration::from_secs(2)).is_ok_and(|r| r.status == 200))
        })?;
        self.child = Some(child);
        Ok(())
    }

    fn flush_log(&self) -> Result<()> {
        let n = self.barriers.fetch_add(1, Ordering::Relaxed);
        let uri = format!("/v2/?shoal-log-barrier={n}");
        let response = http::get(
            &format!("{}{uri}", self.url()),
            None,
            Duration::from_secs(10),
        )?;
        if response.status != 200 {
            bail!("log barrier {uri} answered {}", response.status);
        }
        let what = format!("the registry to log {uri}");
        proc::wait_until(LOG_FLUSH_TIMEOUT, &what, || {
            Ok(parse_log(&self.log()).iter().any(|r| r.uri == uri))
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_yaml(data: &Path, port: u16) -> String {
    // A JSON string is a valid YAML scalar, whatever the path holds.
    let data = serde_json::to_string(&data.display().to_string()).unwrap_or_default();
    format!(
        "version: 0.1
log:
  level: info
  formatter: json
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {data}
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: shoal-integration-test
"
    )
}

/// Picks the "response completed" lines out of the registry's log; anything else (startup
/// messages, the harness' `==>` lines, a partly written last line) is skipped.
pub(crate) fn parse_log(log: &str) -> Vec<LoggedRequest> {
    log.lines()
        .filter(|line| line.starts_with('{'))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| {
            v["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("response completed"))
        })
        .filter_map(|v| {
            Some(LoggedRequest {
                method: v["http.request.method"].as_str()?.to_owned(),
                uri: v["http.request.uri"].as_str()?.to_owned(),
                status: u16::try_from(v["http.response.status"].as_u64()?).ok()?,
                written: v["http.response.written"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0d5c9a08b3f6e7e1b0e6a3b9c2ffdd3c1a1d6bbf4f1b3c35a3f3f5d1c8e0a7b9";

    fn line(method: &str, uri: &str, status: u16, written: u64) -> String {
        format!(
            r#"{{"http.request.method":"{method}","http.request.uri":"{uri}","http.response.status":{status},"http.response.written":{written},"level":"info","msg":"response completed"}}"#
        )
    }

    #[test]
    fn counts_only_successful_gets_of_that_blob() {
        let log = [
            "==> \"docker-registry\" \"serve\"".to_owned(),
            r#"{"level":"info","msg":"listening on 127.0.0.1:5000"}"#.to_owned(),
            line("GET", &format!("/v2/a/blobs/{DIGEST}"), 200, 1000),
            line("GET", &format!("/v2/org/b/blobs/{DIGEST}?ns=x"), 206, 24),
            line("HEAD", &format!("/v2/a/blobs/{DIGEST}"), 200, 0),
            line("GET", &format!("/v2/a/blobs/{DIGEST}"), 404, 157),
            line("GET", &format!("/v2/a/manifests/{DIGEST}"), 200, 500),
            line("GET", "/v2/a/blobs/sha256:other", 200, 7),
            r#"{"http.request.method":"GET","msg":"response compl"#.to_owned(),
        ]
        .join("\n");
        let requests = parse_log(&log);
        assert_eq!(requests.len(), 6);
        let served: u64 = requests
            .iter()
            .filter(|r| r.is_blob_get(DIGEST))
            .map(|r| r.written)
            .sum();
        assert_eq!(served, 1024);
    }
}
