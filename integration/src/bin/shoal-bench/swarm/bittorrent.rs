//! The BitTorrent baseline: opentracker on the tracker host, the first aria2c seeder on the
//! registry host (seeding the blob's file from the image layout), an aria2c leecher per peer
//! host; each copy is checked against the blob's digest once all are done.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use sha2::{Digest as _, Sha256};
use shoal_integration::netns::Host;
use shoal_integration::netns::bittorrent::{Leecher, OpenTracker, Seeder, Torrent};
use shoal_integration::wait_until;

use super::cpu::CpuMeter;
use super::{OPENTRACKER_PORT, Run, Setup, check_interrupted};

pub(super) fn run(s: &Setup, seed_host: &Host, blob_file: &Path) -> Result<Run> {
    let dir = s.dir.join("bittorrent");
    let seed_data = dir.join("seed-data");
    fs::create_dir_all(&seed_data)?;
    let data = seed_data.join("blob");
    if fs::hard_link(blob_file, &data).is_err() {
        fs::copy(blob_file, &data)?;
    }
    let announce = format!("http://{}/announce", s.tracker_host.addr(OPENTRACKER_PORT));
    let torrent = Torrent::make(&data, &announce, &dir.join("blob.torrent"))?;
    let tracker = OpenTracker::start(
        &dir.join("opentracker"),
        s.tracker_host,
        OPENTRACKER_PORT,
        &[&torrent.info_hash],
    )?;
    let seeder = Seeder::start(&dir.join("seeder"), seed_host, &torrent, &seed_data)?;
    wait_until(
        Duration::from_secs(120),
        "the BitTorrent seeder to register",
        || {
            check_interrupted()?;
            Ok(tracker.seeders(&torrent.info_hash)? >= 1)
        },
    )?;

    let start = SystemTime::now();
    let started = Instant::now();
    let cpu = CpuMeter::start(&[seeder.pid(), tracker.pid()])?;
    let mut leechers = s
        .peers
        .iter()
        .map(|host| Leecher::start(&dir.join(&host.label), host, &torrent))
        .collect::<Result<Vec<_>>>()?;
    let mut done: Vec<Option<SystemTime>> = vec![None; leechers.len()];
    while done.iter().any(Option::is_none) {
        check_interrupted()?;
        let left = done.iter().filter(|d| d.is_none()).count();
        ensure!(
            started.elapsed() < s.timeout,
            "{left} BitTorrent leechers still downloading after {:?}",
            s.timeout
        );
        for (leecher, d) in leechers.iter_mut().zip(&mut done) {
            if d.is_none() {
                *d = leecher.finished_at()?;
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let leecher_pids: Vec<Option<u32>> = leechers.iter().map(Leecher::pid).collect();
    let (cpu_busy, cpu_s) = cpu.finish(&leecher_pids)?;
    let files: Vec<PathBuf> = leechers.iter().map(Leecher::file).collect();
    drop(leechers);
    for (file, host) in files.iter().zip(s.peers) {
        let got = sha256_file(file)?;
        ensure!(
            got == s.blob.digest,
            "{}'s BitTorrent copy has digest {got}, expected {}",
            host.label,
            s.blob.digest
        );
    }
    let times = done
        .into_iter()
        .map(|d| {
            d.and_then(|t| t.duration_since(start).ok())
                .map_or(f64::NAN, |t| t.as_secs_f64())
        })
        .collect();
    Ok(Run {
        start: started,
        times,
        cpu_busy,
        cpu_s,
    })
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}
