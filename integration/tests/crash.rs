//! `kill -9` of `shoal node` during 20 parallel ingests and snapshot commits, then a restart:
//! everything containerd was told is committed is intact, nothing half-made is visible, and the
//! interrupted ingests can be resumed or aborted, all through the gRPC API containerd uses.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    StatSnapshotRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::{
    AbortRequest, InfoRequest, ListContentRequest, ListStatusesRequest, ReadContentRequest,
    WriteAction, WriteContentRequest,
};
use containerd_client::with_namespace;
use sha2::{Digest as _, Sha256};
use shoal_integration::shoal::{Node, NodeOptions};
use shoal_integration::{random_bytes, wait_until};
use tokio_stream::StreamExt;
use tonic::Request;
use tonic::transport::Channel;

const WORKERS: usize = 20;
const BLOB: usize = 8 << 20;
const CHUNK: usize = 64 << 10;
const NS: &str = "default";

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn blob_for(worker: usize) -> Vec<u8> {
    random_bytes(1000 + worker as u64, BLOB)
}

/// Writes `data[from..]` to ingest `r#ref` and commits it, as containerd's content writer does.
async fn write_blob(channel: Channel, r#ref: &str, data: &[u8], from: usize) -> Result<()> {
    let expected = digest_of(data);
    let mut msgs = vec![WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: r#ref.into(),
        total: data.len() as i64,
        expected: expected.clone(),
        ..Default::default()
    }];
    for (i, chunk) in data[from..].chunks(CHUNK).enumerate() {
        msgs.push(WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: r#ref.into(),
            offset: (from + i * CHUNK) as i64,
            data: chunk.to_vec(),
            ..Default::default()
        });
    }
    msgs.push(WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: r#ref.into(),
        offset: data.len() as i64,
        total: data.len() as i64,
        expected,
        ..Default::default()
    });
    // One message at a time, each answered, as containerd's proxy writer does.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut client = ContentClient::new(channel);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    tx.send(msgs[0].clone()).await?;
    let mut responses = client
        .write(with_namespace!(stream, NS))
        .await?
        .into_inner();
    responses.next().await.context("no answer to stat")??;
    for msg in msgs.into_iter().skip(1) {
        tx.send(msg).await?;
        responses.next().await.context("stream ended")??;
    }
    Ok(())
}

async fn read_digest(channel: Channel, digest: &str) -> Result<String> {
    let mut client = ContentClient::new(channel);
    let req = ReadContentRequest {
        digest: digest.into(),
        offset: 0,
        size: 0,
    };
    let mut stream = client.read(with_namespace!(req, NS)).await?.into_inner();
    let mut hasher = Sha256::new();
    while let Some(chunk) = stream.next().await {
        hasher.update(&chunk?.data);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// Prepares and commits a chain of snapshots until the node dies.
async fn commit_chain(channel: Channel, worker: usize, acked: Arc<Mutex<Vec<String>>>) {
    let mut client = SnapshotsClient::new(channel);
    let mut parent = String::new();
    for j in 0.. {
        let (key, name) = (
            format!("active-{worker}-{j}"),
            format!("committed-{worker}-{j}"),
        );
        let prepare = PrepareSnapshotRequest {
            snapshotter: "shoal".into(),
            key: key.clone(),
            parent: parent.clone(),
            ..Default::default()
        };
        if client.prepare(with_namespace!(prepare, NS)).await.is_err() {
            return;
        }
        let commit = CommitSnapshotRequest {
            snapshotter: "shoal".into(),
            name: name.clone(),
            key,
            ..Default::default()
        };
        if client.commit(with_namespace!(commit, NS)).await.is_err() {
            return;
        }
        acked.lock().expect("lock").push(name.clone());
        parent = name;
    }
}

fn mount_and_unmount(
    mounts: &[containerd_client::types::Mount],
    target: &std::path::Path,
) -> Result<()> {
    ensure!(mounts.len() == 1, "expected one mount, got {mounts:?}");
    let m = &mounts[0];
    std::fs::create_dir_all(target)?;
    let status = Command::new("mount")
        .args(["-t", &m.r#type, "-o", &m.options.join(","), &m.source])
        .arg(target)
        .status()?;
    ensure!(status.success(), "mount {m:?} failed");
    let listed = std::fs::read_dir(target).map(|d| d.count());
    let status = Command::new("umount").arg(target).status()?;
    ensure!(status.success(), "umount {} failed", target.display());
    listed.with_context(|| format!("reading mounted {m:?}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_ingests_and_commits_loses_nothing_committed() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping: needs root to mount snapshots");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut node = Node::start(dir, "node", &NodeOptions::default())?;
    let channel = containerd_client::connect(&node.socket).await?;

    let acked_blobs = Arc::new(Mutex::new(Vec::new()));
    let acked_snapshots = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let (ingest_channel, acked) = (channel.clone(), acked_blobs.clone());
        tasks.push(tokio::spawn(async move {
            let data = blob_for(worker);
            if write_blob(ingest_channel, &format!("ingest-{worker}"), &data, 0)
                .await
                .is_ok()
            {
                acked.lock().expect("lock").push(worker);
            }
        }));
        tasks.push(tokio::spawn(commit_chain(
            channel.clone(),
            worker,
            acked_snapshots.clone(),
        )));
    }
    // Kill it in the thick of things: some work acknowledged, some surely in flight.
    let (blobs, snaps) = (acked_blobs.clone(), acked_snapshots.clone());
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(60), "some commits to be acknowledged", || {
            Ok(blobs.lock().expect("lock").len() >= 3 && snaps.lock().expect("lock").len() >= 10)
        })
    })
    .await??;
    node.child.kill()?;
    for t in tasks {
        t.await?;
    }
    let acked_blobs = acked_blobs.lock().expect("lock").clone();
    let acked_snapshots = acked_snapshots.lock().expect("lock").clone();
    ensure!(
        acked_blobs.len() < WORKERS,
        "every ingest finished before the kill: the test proved nothing"
    );

    let node = Node::start(dir, "node", &NodeOptions::default())?;
    let channel = containerd_client::connect(&node.socket).await?;
    let mut content = ContentClient::new(channel.clone());

    // Every acknowledged blob reads back with its digest.
    for &worker in &acked_blobs {
        let digest = digest_of(&blob_for(worker));
        ensure!(
            read_digest(channel.clone(), &digest).await? == digest,
            "blob of worker {worker} is corrupt"
        );
    }
    // Nothing listed is half-written.
    let mut listed = content
        .list(with_namespace!(ListContentRequest::default(), NS))
        .await?
        .into_inner();
    while let Some(page) = listed.next().await {
        for info in page?.info {
            ensure!(
                read_digest(channel.clone(), &info.digest).await? == info.digest,
                "{} is corrupt",
                info.digest
            );
        }
    }
    // Interrupted ingests resume (even workers) or are aborted (odd ones).
    eprintln!(
        "acknowledged before the kill: {} blobs, {} snapshots",
        acked_blobs.len(),
        acked_snapshots.len()
    );
    let statuses = content
        .list_statuses(with_namespace!(ListStatusesRequest::default(), NS))
        .await?
        .into_inner()
        .statuses;
    eprintln!("interrupted ingests after the restart: {}", statuses.len());
    for status in statuses {
        let worker: usize = status.r#ref.trim_start_matches("ingest-").parse()?;
        let data = blob_for(worker);
        if worker.is_multiple_of(2) {
            write_blob(
                channel.clone(),
                &status.r#ref,
                &data,
                status.offset as usize,
            )
            .await
            .with_context(|| format!("resuming {} at {}", status.r#ref, status.offset))?;
            let info = InfoRequest {
                digest: digest_of(&data),
            };
            content
                .info(with_namespace!(info, NS))
                .await
                .context("resumed blob missing")?;
        } else {
            content
                .abort(with_namespace!(
                    AbortRequest {
                        r#ref: status.r#ref.clone()
                    },
                    NS
                ))
                .await?;
        }
    }
    let left = content
        .list_statuses(with_namespace!(ListStatusesRequest::default(), NS))
        .await?
        .into_inner()
        .statuses;
    ensure!(
        left.iter().all(|s| s
            .r#ref
            .trim_start_matches("ingest-")
            .parse::<usize>()
            .is_ok_and(|w| w % 2 == 0))
            && left.len() <= WORKERS / 2
    );

    // Every acknowledged snapshot is committed and mounts.
    let mut snapshots = SnapshotsClient::new(channel.clone());
    for (i, name) in acked_snapshots.iter().enumerate() {
        let stat = StatSnapshotRequest {
            snapshotter: "shoal".into(),
            key: name.clone(),
        };
        snapshots
            .stat(with_namespace!(stat, NS))
            .await
            .with_context(|| format!("{name} lost"))?;
        let view = ViewSnapshotRequest {
            snapshotter: "shoal".into(),
            key: format!("view-{i}"),
            parent: name.clone(),
            ..Default::default()
        };
        let mounts = snapshots
            .view(with_namespace!(view, NS))
            .await?
            .into_inner()
            .mounts;
        mount_and_unmount(&mounts, &dir.join("mnt"))?;
    }
    // Every snapshot listed has its directory: Mounts works for all active ones.
    let mut list = snapshots
        .list(with_namespace!(
            ListSnapshotsRequest {
                snapshotter: "shoal".into(),
                ..Default::default()
            },
            NS
        ))
        .await?
        .into_inner();
    while let Some(page) = list.next().await {
        for info in page?.info {
            if info.kind != containerd_client::services::v1::snapshots::Kind::Committed as i32 {
                let req = MountsRequest {
                    snapshotter: "shoal".into(),
                    key: info.name.clone(),
                };
                snapshots
                    .mounts(with_namespace!(req, NS))
                    .await
                    .with_context(|| format!("{} has no mounts", info.name))?;
            }
        }
    }
    Ok(())
}
