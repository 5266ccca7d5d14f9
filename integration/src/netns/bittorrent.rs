//! A BitTorrent swarm on [`Host`]s, the baseline Shoal's swarm is measured against: Debian's
//! opentracker, one aria2c seeder and aria2c leechers.
//!
//! The traps (RECIPES.md): opentracker serves only whitelisted info-hashes and chroots into
//! `-d DIR` before reading the whitelist named by `-w`; a leecher given both `--seed-time` and
//! `--seed-ratio` quits as soon as it finishes, so leechers get `--seed-time` only, and keep
//! seeding until they are stopped. Each leecher timestamps its own completion with an
//! `--on-bt-download-complete` hook (wall clock, nanoseconds), so the harness's polling does
//! not blur the figures.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use super::Host;
use crate::http;
use crate::proc::{self, Child, wait_for_tcp};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `.torrent` file and what identifies it.
#[derive(Clone, Debug)]
pub struct Torrent {
    pub path: PathBuf,
    /// Lower-case hex, as opentracker's whitelist wants it.
    pub info_hash: String,
    /// The file name inside the torrent (the data file's basename).
    pub name: String,
}

impl Torrent {
    /// `mktorrent -l 22` (4 MiB pieces) of `data`, announcing to `announce`, written to `out`.
    pub fn make(data: &Path, announce: &str, out: &Path) -> Result<Torrent> {
        let name = data
            .file_name()
            .and_then(|n| n.to_str())
            .context("the data file has no usable name")?
            .to_owned();
        proc::run_ok(
            Command::new("mktorrent")
                .args(["-a", announce, "-l", "22", "-o"])
                .arg(out)
                .arg(data),
            Duration::from_secs(300),
        )?;
        let shown = proc::run_ok(
            Command::new("aria2c").arg("-S").arg(out),
            Duration::from_secs(30),
        )?;
        let info_hash = shown
            .lines()
            .find_map(|l| l.strip_prefix("Info Hash: "))
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| h.len() == 40 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .with_context(|| format!("no info hash in `aria2c -S` output:\n{shown}"))?;
        Ok(Torrent {
            path: out.to_owned(),
            info_hash,
            name,
        })
    }
}

/// opentracker on a host, in whitelist mode; stopped when dropped.
#[derive(Debug)]
pub struct OpenTracker {
    host: Host,
    addr: String,
    child: Child,
}

impl OpenTracker {
    /// Serves `info_hashes` only, on `host:port` (TCP and UDP); chroots into `dir`.
    pub fn start(dir: &Path, host: &Host, port: u16, info_hashes: &[&str]) -> Result<OpenTracker> {
        let root = dir.join("root");
        fs::create_dir_all(&root)?;
        // It drops to `nobody` after the chroot; let it in.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
        fs::write(root.join("whitelist"), info_hashes.join("\n") + "\n")?;
        let addr = host.addr(port);
        let mut cmd = host.command("opentracker");
        cmd.arg("-i")
            .arg(host.ip.to_string())
            .args(["-p", &port.to_string(), "-P", &port.to_string(), "-d"])
            .arg(&root)
            .args(["-w", "whitelist"]);
        let child = Child::spawn("opentracker", cmd, dir)?;
        host.run(|| wait_for_tcp(addr.as_str(), START_TIMEOUT))
            .context("waiting for opentracker")?;
        Ok(OpenTracker {
            host: host.clone(),
            addr,
            child,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    pub fn announce_url(&self) -> String {
        format!("http://{}/announce", self.addr)
    }

    /// How many complete peers (seeders) the tracker knows for `info_hash`, by scrape.
    pub fn seeders(&self, info_hash: &str) -> Result<u64> {
        let escaped: String = info_hash
            .as_bytes()
            .chunks(2)
            .map(|pair| format!("%{}", String::from_utf8_lossy(pair)))
            .collect();
        let url = format!("http://{}/scrape?info_hash={escaped}", self.addr);
        let body = self
            .host
            .run(|| Ok(http::get(&url, None, Duration::from_secs(5))?.body))?;
        let body = String::from_utf8_lossy(&body);
        let Some(rest) = body.split("8:completei").nth(1) else {
            return Ok(0);
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits
            .parse()
            .with_context(|| format!("reading a scrape answer: {body}"))
    }
}

/// Options every aria2c here shares: no DHT or local discovery (the tracker is the only way to
/// find peers, as for Shoal), IPv4, quiet output.
fn aria2c(host: &Host, torrent: &Torrent, data_dir: &Path) -> Command {
    let mut cmd = host.command("aria2c");
    cmd.arg(format!("--dir={}", data_dir.display()))
        .args([
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--disable-ipv6=true",
            "--file-allocation=none",
            "--summary-interval=0",
            "--enable-color=false",
            "--console-log-level=notice",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "--bt-save-metadata=false",
            "--listen-port=6881",
        ])
        .arg(&torrent.path);
    cmd
}

/// The first seeder: aria2c with the whole file, checked (`-V`), seeding for ever.
#[derive(Debug)]
pub struct Seeder {
    child: Child,
}

impl Seeder {
    /// Seeds `data_dir/<torrent name>` from `host`; logs in `dir`.
    pub fn start(dir: &Path, host: &Host, torrent: &Torrent, data_dir: &Path) -> Result<Seeder> {
        let mut cmd = aria2c(host, torrent, data_dir);
        cmd.args(["-V", "--seed-ratio=0.0"]);
        Ok(Seeder {
            child: Child::spawn("aria2c-seeder", cmd, dir)?,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }
}

/// A leecher that records when it has the whole file, then seeds until stopped.
#[derive(Debug)]
pub struct Leecher {
    child: Child,
    data_dir: PathBuf,
    done: PathBuf,
    name: String,
}

impl Leecher {
    /// Downloads `torrent` on `host` into `dir/data`; logs and the completion stamp in `dir`.
    pub fn start(dir: &Path, host: &Host, torrent: &Torrent) -> Result<Leecher> {
        let data_dir = dir.join("data");
        fs::create_dir_all(&data_dir)?;
        let done = dir.join("done");
        let hook = dir.join("on-complete.sh");
        let stamp = format!(
            "#!/bin/sh\ndate +%s.%N > '{0}.tmp' && mv '{0}.tmp' '{0}'\n",
            done.display()
        );
        fs::write(&hook, stamp)?;
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755))?;
        let mut cmd = aria2c(host, torrent, &data_dir);
        // Minutes; far beyond any run. The harness stops it.
        cmd.arg("--seed-time=600")
            .arg(format!("--on-bt-download-complete={}", hook.display()));
        Ok(Leecher {
            child: Child::spawn("aria2c-leecher", cmd, dir)?,
            data_dir,
            done,
            name: torrent.name.clone(),
        })
    }

    /// When the download completed, once it has; fails if aria2c exited first.
    pub fn finished_at(&mut self) -> Result<Option<SystemTime>> {
        if let Ok(text) = fs::read_to_string(&self.done) {
            let secs: f64 = text
                .trim()
                .parse()
                .with_context(|| format!("reading {}: {text:?}", self.done.display()))?;
            return Ok(Some(UNIX_EPOCH + Duration::from_secs_f64(secs)));
        }
        self.child.ensure_running()?;
        Ok(None)
    }

    /// The downloaded file.
    pub fn file(&self) -> PathBuf {
        self.data_dir.join(&self.name)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }
}
