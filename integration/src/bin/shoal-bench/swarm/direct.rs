//! The direct run: every peer GETs the blob from the registry itself, at the same moment. Its
//! [`fetch_all`] (concurrent GETs released by a barrier, each checked against the blob's digest)
//! also times the Shoal run, which is the same GETs aimed at each peer's own node.

use std::io::Read;
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest as _, Sha256};
use shoal_integration::netns::{self, Host};

use super::cpu::CpuMeter;
use super::{Blob, REPO, Run, Setup, check_interrupted};

/// Every peer GETs the blob from the registry.
pub(super) fn run(s: &Setup) -> Result<Run> {
    let targets = s
        .peers
        .iter()
        .map(|p| {
            let url = format!(
                "http://{}/v2/{REPO}/blobs/{}",
                s.registry.addr(),
                s.blob.digest
            );
            (p.clone(), format!("http://{}/v2/", s.registry.addr()), url)
        })
        .collect();
    fetch_all(targets, s.blob, s.timeout, &[s.registry.pid()])
}

/// GETs a blob on every host at the same moment: `(host, warm-up URL, blob URL)`. Each client
/// opens its connection with the warm-up request, waits at a barrier, then streams the blob
/// through sha256. Returns each peer's completion time.
pub(super) fn fetch_all(
    targets: Vec<(Host, String, String)>,
    blob: &Blob,
    timeout: Duration,
    servers: &[Option<u32>],
) -> Result<Run> {
    let n = targets.len();
    let barrier = Arc::new(Barrier::new(n + 1));
    let (tx, rx) = mpsc::channel();
    for (i, (host, warm, url)) in targets.into_iter().enumerate() {
        let (barrier, tx, blob) = (barrier.clone(), tx.clone(), blob.clone());
        thread::spawn(move || {
            // Every thread reaches the barrier, ready or not, so a failure cannot hang the rest.
            let client = netns::enter(&host.netns).and_then(|()| {
                let client = reqwest::blocking::Client::builder()
                    .timeout(timeout)
                    .build()?;
                client.get(&warm).send()?.error_for_status()?.bytes()?;
                Ok(client)
            });
            barrier.wait();
            let result = client
                .and_then(|c| fetch_and_check(&c, &url, &blob))
                .with_context(|| format!("{}: GET {url}", host.label));
            let _ = tx.send((i, result));
        });
    }
    drop(tx);
    barrier.wait();
    let start = Instant::now();
    let cpu = CpuMeter::start(servers)?;
    let mut ends = vec![None; n];
    let mut left = n;
    while left > 0 {
        check_interrupted()?;
        ensure!(
            start.elapsed() < timeout,
            "{left} of {n} peers still fetching after {timeout:?}"
        );
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((i, result)) => {
                ends[i] = Some(result?);
                left -= 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("a fetch thread died"),
        }
    }
    let (cpu_busy, cpu_s) = cpu.finish(&[])?;
    let times = ends
        .into_iter()
        .map(|e| e.map_or(f64::NAN, |end| (end - start).as_secs_f64()))
        .collect();
    Ok(Run {
        start,
        times,
        cpu_busy,
        cpu_s,
    })
}

/// Streams `url` through sha256; the instant its last byte arrived, if it is the blob.
fn fetch_and_check(client: &reqwest::blocking::Client, url: &str, blob: &Blob) -> Result<Instant> {
    let mut response = client.get(url).send()?;
    ensure!(response.status().is_success(), "HTTP {}", response.status());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut len = 0u64;
    loop {
        let n = response.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    let end = Instant::now();
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    ensure!(
        got == blob.digest && len == blob.size,
        "got {len} bytes with digest {got}, expected {} bytes of {}",
        blob.size,
        blob.digest
    );
    Ok(end)
}
