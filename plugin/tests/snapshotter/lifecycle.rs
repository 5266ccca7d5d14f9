//! Prepare, View, Mounts, Commit, Remove, Usage, Cleanup; restarts and crash leftovers.

use std::collections::HashSet;
use std::fs;

use tonic::Code;

use crate::harness::{Client, Labels, Server, bind, code, labels, overlay};

#[tokio::test]
async fn prepare_commit_chains_and_their_mounts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;

    // No parent: a writable bind mount of the snapshot's own fs dir.
    assert_eq!(
        c.prepare("a1", "", Labels::new()).await?,
        vec![bind(s.fs(1), "rw")]
    );
    assert!(s.dir(1).join("work").is_dir());
    let info = c.stat("a1").await?;
    assert_eq!(
        (info.name.as_str(), info.kind, info.parent.as_str()),
        ("a1", 2, "")
    );
    c.commit("c1", "a1", labels(&[("l", "1")])).await?;
    assert_eq!(
        code(c.stat("a1").await)?,
        Code::NotFound,
        "the key is gone after commit"
    );
    let c1 = c.stat("c1").await?;
    assert_eq!((c1.kind, c1.parent.as_str()), (3, ""));
    assert_eq!(c1.labels, labels(&[("l", "1")]));
    assert_eq!(c1.created_at, c1.updated_at);

    // One parent: overlay with upper and work dirs of the new snapshot.
    let m = c.prepare("a2", "c1", Labels::new()).await?;
    let expected = overlay(vec![
        format!("workdir={}", s.work(2)),
        format!("upperdir={}", s.fs(2)),
        format!("lowerdir={}", s.fs(1)),
    ]);
    assert_eq!(m, vec![expected]);
    assert_eq!(c.mounts("a2").await?, m, "Mounts repeats Prepare");
    c.commit("c2", "a2", Labels::new()).await?;
    assert_eq!(c.stat("c2").await?.parent, "c1");
    let parent = c.stat("c2").await?.parent;
    assert_eq!(c.stat(&parent).await?.parent, "", "transitivity");

    // Views: read-only overlay of several parents (nearest first), bind of a single one.
    let v2 = c.view("v2", "c2", Labels::new()).await?;
    assert_eq!(
        v2,
        vec![overlay(vec![format!("lowerdir={}:{}", s.fs(2), s.fs(1))])]
    );
    assert!(s.dir(3).join("fs").is_dir() && !s.dir(3).join("work").exists());
    assert_eq!(
        c.view("v1", "c1", Labels::new()).await?,
        vec![bind(s.fs(1), "ro")]
    );
    assert_eq!(
        c.view("v0", "", Labels::new()).await?,
        vec![bind(s.fs(5), "ro")]
    );
    assert_eq!(c.mounts("v2").await?, v2);
    assert_eq!(c.stat("v2").await?.kind, 1);
    assert_eq!(code(c.mounts("c1").await)?, Code::FailedPrecondition);

    // Active with two parents.
    let m = c.prepare("a3", "c2", Labels::new()).await?;
    let expected = overlay(vec![
        format!("workdir={}", s.work(6)),
        format!("upperdir={}", s.fs(6)),
        format!("lowerdir={}:{}", s.fs(2), s.fs(1)),
    ]);
    assert_eq!(m, vec![expected]);
    s.stop(c).await
}

#[tokio::test]
async fn one_key_one_snapshot() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    c.layer("base", "").await?;
    c.prepare("new", "base", Labels::new()).await?;
    assert_eq!(
        code(c.view("new", "base", Labels::new()).await)?,
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.prepare("new", "", Labels::new()).await)?,
        Code::AlreadyExists
    );
    c.view("view", "base", Labels::new()).await?;
    assert_eq!(
        code(c.view("view", "base", Labels::new()).await)?,
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.prepare("base", "", Labels::new()).await)?,
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.commit("base", "new", Labels::new()).await)?,
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.commit("view", "new", Labels::new()).await)?,
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.commit("again", "base", Labels::new()).await)?,
        Code::FailedPrecondition
    );
    assert_eq!(
        code(c.commit("again", "view", Labels::new()).await)?,
        Code::FailedPrecondition
    );
    assert_eq!(
        code(c.commit("again", "missing", Labels::new()).await)?,
        Code::NotFound
    );
    // The failed calls changed nothing.
    assert_eq!(c.list(&[]).await?, ["base", "new", "view"]);
    assert_eq!(c.stat("new").await?.kind, 2);
    s.stop(c).await
}

#[tokio::test]
async fn remove_refuses_parents_and_frees_keys() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    c.layer("base", "").await?;
    c.layer("inter", "base").await?;
    c.prepare("top", "inter", Labels::new()).await?;
    assert_eq!(code(c.remove("inter").await)?, Code::FailedPrecondition);
    assert_eq!(code(c.remove("base").await)?, Code::FailedPrecondition);
    c.remove("top").await?;
    assert!(!s.dir(3).exists(), "the directory goes with the record");
    c.remove("inter").await?;
    c.remove("base").await?;
    assert!(!s.dir(1).exists() && !s.dir(2).exists());
    assert_eq!(code(c.remove("base").await)?, Code::NotFound);
    assert!(c.list(&[]).await?.is_empty());

    // containerd's checkRemove: keys are free again once removed.
    c.layer("committed-1", "").await?;
    c.prepare("reuse-1", "committed-1", Labels::new()).await?;
    c.remove("reuse-1").await?;
    c.view("reuse-1", "committed-1", Labels::new()).await?;
    c.remove("reuse-1").await?;
    c.prepare("reuse-1", "", Labels::new()).await?;
    c.remove("committed-1").await?;
    c.commit("committed-1", "reuse-1", Labels::new()).await?;
    assert_eq!(c.list(&[]).await?, ["committed-1"]);
    s.stop(c).await
}

#[tokio::test]
async fn usage_is_measured_and_kept_at_commit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    c.prepare("a", "", Labels::new()).await?;
    let fs_dir = s.dir(1).join("fs");
    fs::write(fs_dir.join("file"), vec![7u8; 10_000])?;
    fs::hard_link(fs_dir.join("file"), fs_dir.join("link"))?;
    fs::create_dir(fs_dir.join("sub"))?;
    let active = c.usage("a").await?;
    assert_eq!(active.inodes, 3, "root, file (linked twice) and sub");
    assert!(active.size >= 10_000, "{active:?}");

    c.commit("c", "a", Labels::new()).await?;
    fs::write(fs_dir.join("later"), b"not part of the commit")?;
    assert_eq!(
        c.usage("c").await?,
        active,
        "a committed snapshot's usage is stored"
    );
    c.view("v", "c", Labels::new()).await?;
    assert_eq!(c.usage("v").await?.inodes, 0);
    assert_eq!(code(c.usage("missing").await)?, Code::NotFound);
    s.stop(c).await
}

#[tokio::test]
async fn cleanup_removes_only_what_nothing_references() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    c.layer("keep", "").await?;
    c.prepare("active", "keep", Labels::new()).await?;
    let snapshots = s.root.join("snapshots");
    fs::create_dir_all(snapshots.join("new-half-made/fs"))?;
    fs::create_dir_all(snapshots.join("77/fs"))?;
    fs::write(snapshots.join("77/fs/file"), b"x")?;
    fs::create_dir_all(snapshots.join("rm-5"))?;
    fs::write(snapshots.join("stray"), b"x")?;

    c.cleanup().await?;
    let left: HashSet<String> = fs::read_dir(&snapshots)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(left, HashSet::from(["1".to_owned(), "2".to_owned()]));
    assert_eq!(c.stat("active").await?.parent, "keep");
    c.cleanup().await?;
    s.stop(c).await
}

#[tokio::test]
async fn a_directory_left_by_a_crash_does_not_block_its_id() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    c.layer("c", "").await?;
    // A crash after renaming snapshot 2's directory into place but before its record
    // committed: the id is handed out again.
    fs::create_dir_all(s.dir(2).join("fs"))?;
    fs::write(s.dir(2).join("fs/stale"), b"half-made")?;
    c.prepare("next", "c", Labels::new()).await?;
    assert_eq!(
        fs::read_dir(s.dir(2).join("fs"))?.count(),
        0,
        "a fresh, empty layer"
    );
    assert!(s.dir(2).join("work").is_dir());
    s.stop(c).await
}

#[tokio::test]
async fn metadata_survives_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    c.prepare("c1-a", "", Labels::new()).await?;
    c.commit("c1", "c1-a", labels(&[("containerd.io/gc.root", "x")]))
        .await?;
    c.prepare("a", "c1", labels(&[("l", "a")])).await?;
    c.view("v", "c1", labels(&[("l", "v")])).await?;
    let mut before = Vec::new();
    for key in ["c1", "a", "v"] {
        before.push(c.stat(key).await?);
    }
    let mounts = c.mounts("a").await?;
    s.stop(c).await?;

    let (s, mut c) = Server::start(dir.path()).await?;
    for info in before {
        assert_eq!(c.stat(&info.name).await?, info);
    }
    assert_eq!(c.mounts("a").await?, mounts);
    assert_eq!(c.list(&["labels.l"]).await?, ["a", "v"]);
    assert_eq!(code(c.remove("c1").await)?, Code::FailedPrecondition);
    // Ids are not reused after a restart.
    assert_eq!(
        c.prepare("new", "", Labels::new()).await?,
        vec![bind(s.fs(4), "rw")]
    );
    s.stop(c).await
}

#[tokio::test]
async fn parallel_prepares_and_commits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    c.layer("base", "").await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut c = Client {
            inner: c.inner.clone(),
        };
        tasks.spawn(async move {
            let key = format!("key-{i}");
            c.prepare(&key, "base", Labels::new()).await?;
            c.commit(&format!("layer-{i}"), &key, Labels::new()).await?;
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    assert_eq!(c.list(&["kind==committed"]).await?.len(), 21);
    assert_eq!(
        fs::read_dir(s.root.join("snapshots"))?.count(),
        21,
        "no leftovers"
    );
    s.stop(c).await
}
