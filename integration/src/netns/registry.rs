//! `docker-registry` on a [`Host`], listening on the host's address so every other host
//! reaches it over its shaped link.
//!
//! Like [`crate::Registry`] (which stays on 127.0.0.1 of the test's own namespace), it logs
//! one JSON object per request, and [`HostRegistry::requests`] reads that log back, so a
//! benchmark can tell how many bytes of a blob the registry served during one phase: take
//! `requests().len()` before the phase, and sum what came after.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Host;
use crate::http;
use crate::proc::{self, Child};
use crate::registry::{LoggedRequest, parse_log};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A registry on a host of a [`Network`](super::Network); stopped when dropped.
#[derive(Debug)]
pub struct HostRegistry {
    host: Host,
    addr: String,
    log: PathBuf,
    child: Child,
    barriers: AtomicU64,
}

impl HostRegistry {
    /// Starts a registry on `host:port` with its storage, config and log under `dir`.
    pub fn start(dir: &Path, host: &Host, port: u16) -> Result<HostRegistry> {
        let data = dir.join("data");
        fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let addr = host.addr(port);
        let config = dir.join("registry.yml");
        fs::write(&config, config_yaml(&data, &addr))?;
        let mut cmd = host.command("docker-registry");
        cmd.arg("serve").arg(&config);
        let mut child = Child::spawn("registry", cmd, dir)?;
        let url = format!("http://{addr}/v2/");
        host.run(|| {
            proc::wait_until(START_TIMEOUT, &format!("the registry at {url}"), || {
                child.ensure_running()?;
                Ok(http::get(&url, None, Duration::from_secs(2)).is_ok_and(|r| r.status == 200))
            })
        })?;
        Ok(HostRegistry {
            host: host.clone(),
            addr,
            log: dir.join("registry.log"),
            child,
            barriers: AtomicU64::new(0),
        })
    }

    /// `ip:port`: the registry part of image references and of mirrors' `?ns=`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// Every request finished so far, in log order (see [`crate::Registry::requests`] for the
    /// marker request that makes sure earlier ones are logged).
    pub fn requests(&self) -> Result<Vec<LoggedRequest>> {
        let n = self.barriers.fetch_add(1, Ordering::Relaxed);
        let uri = format!("/v2/?shoal-log-barrier={n}");
        let url = format!("http://{}{uri}", self.addr);
        let status = self
            .host
            .run(|| Ok(http::get(&url, None, Duration::from_secs(10))?.status))?;
        if status != 200 {
            bail!("log barrier {uri} answered {status}");
        }
        let what = format!("the registry to log {uri}");
        proc::wait_until(LOG_FLUSH_TIMEOUT, &what, || {
            Ok(parse_log(&proc::read_log(&self.log))
                .iter()
                .any(|r| r.uri == uri))
        })?;
        Ok(parse_log(&proc::read_log(&self.log)))
    }
}

/// Body bytes of successful GETs of `digest` (full or ranged) among `requests`.
pub fn blob_bytes(requests: &[LoggedRequest], digest: &str) -> u64 {
    requests
        .iter()
        .filter(|r| r.is_blob_get(digest))
        .map(|r| r.written)
        .sum()
}

fn config_yaml(data: &Path, addr: &str) -> String {
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
  addr: {addr}
  secret: shoal-bench
"
    )
}
