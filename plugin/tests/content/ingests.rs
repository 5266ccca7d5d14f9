//! Ingests: resuming, offsets, size and digest checks at commit, present content, one writer
//! per ref, Abort.

use containerd_client::services::v1::{self as api, WriteAction};
use shoal_p2p::Digest;
use tonic::Code;

use crate::harness::{Labels, Node, blob, code};

#[tokio::test]
async fn interrupted_ingest_resumes_where_it_stopped() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let data = blob(1 << 20, 2);
    let digest = Digest::of(&data).to_string();
    let mut w = node.writer("default/3/layer", data.len(), &digest).await?;
    w.write(&data[..300_000]).await?;
    drop(w); // the client goes away mid-blob

    let status = node.status("default/3/layer").await?;
    assert_eq!((status.offset, status.total), (300_000, data.len() as i64));
    assert_eq!(status.expected, digest);
    assert_eq!(
        node.statuses(&["ref==default/3/layer"]).await?,
        vec!["default/3/layer"]
    );
    assert!(node.statuses(&["ref==other"]).await?.is_empty());
    assert_eq!(
        code(node.statuses(&["ref=="]).await)?,
        Code::InvalidArgument
    );

    let mut w = node.writer_when_free("default/3/layer").await?;
    assert_eq!(w.offset, 300_000, "STAT tells where to resume");
    w.write(&data[300_000..]).await?;
    let done = w.commit(data.len(), &digest, Labels::new()).await?;
    assert_eq!(done.digest, digest);
    assert_eq!(node.read(&digest, 0, 0).await?, data);

    // A write at offset 0 starts the ingest over, as containerd's Truncate(0) does.
    let mut w = node.writer("default/4/layer", 0, "").await?;
    w.write(b"stale bytes").await?;
    let resp = w.write_at(0, b"fresh").await?;
    assert_eq!(
        (resp.offset, resp.digest),
        (5, Digest::of(b"fresh").to_string())
    );
    let done = w
        .commit(5, &Digest::of(b"fresh").to_string(), Labels::new())
        .await?;
    assert_eq!(node.read(&done.digest, 0, 0).await?, b"fresh");
    node.stop().await
}

#[tokio::test]
async fn writes_at_the_wrong_offset_are_out_of_range() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut w = node.writer("default/5/layer", 0, "").await?;
    w.write(b"0123456789").await?;
    assert_eq!(code(w.write_at(5, b"xx").await)?, Code::OutOfRange);
    assert_eq!(
        code(w.write_at(11, b"xx").await)?,
        Code::Internal,
        "the stream has ended"
    );
    let mut w = node.writer_when_free("default/5/layer").await?;
    assert_eq!(code(w.write_at(-1, b"xx").await)?, Code::OutOfRange);
    let mut w = node.writer_when_free("default/5/layer").await?;
    let commit_at = w.send(api::WriteContentRequest {
        action: WriteAction::Commit.into(),
        offset: 3,
        ..Default::default()
    });
    assert_eq!(code(commit_at.await)?, Code::OutOfRange);
    assert_eq!(
        node.status("default/5/layer").await?.offset,
        10,
        "nothing was written"
    );
    node.stop().await
}

#[tokio::test]
async fn commit_checks_size_and_digest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let data = blob(100_000, 3);
    let digest = Digest::of(&data).to_string();
    let wrong = Digest::of(b"something else").to_string();

    let mut w = node.writer("default/6/layer", 0, "").await?;
    w.write(&data).await?;
    assert_eq!(
        code(w.commit(data.len(), &wrong, Labels::new()).await)?,
        Code::FailedPrecondition
    );
    let mut w = node.writer_when_free("default/6/layer").await?;
    assert_eq!(w.offset, data.len() as i64, "the ingest is kept");
    assert_eq!(
        code(w.commit(data.len() + 1, &digest, Labels::new()).await)?,
        Code::FailedPrecondition
    );
    for d in [&digest, &wrong] {
        assert_eq!(
            code(node.info(d).await)?,
            Code::NotFound,
            "nothing was committed"
        );
    }
    assert!(node.list(&[]).await?.is_empty());

    let mut w = node.writer_when_free("default/6/layer").await?;
    let done = w.commit(data.len(), &digest, Labels::new()).await?;
    assert_eq!(done.digest, digest);
    node.stop().await
}

#[tokio::test]
async fn committing_present_content_is_already_exists() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let data = blob(50_000, 4);
    let digest = node.put("default/7/layer", &data, Labels::new()).await?;

    // Negotiating with the expected digest: containerd then shares the blob.
    let early = node.writer("default/8/layer", data.len(), &digest).await;
    assert_eq!(code(early)?, Code::AlreadyExists);
    // The same bytes written without announcing them: found at commit, ingest removed.
    let mut w = node.writer("default/9/layer", 0, "").await?;
    w.write(&data).await?;
    assert_eq!(
        code(w.commit(data.len(), "", Labels::new()).await)?,
        Code::AlreadyExists
    );
    assert_eq!(code(node.status("default/9/layer").await)?, Code::NotFound);
    // Expected digest on the commit only.
    let mut w = node.writer("default/10/layer", 0, "").await?;
    w.write(&data[..10]).await?;
    assert_eq!(
        code(w.commit(data.len(), &digest, Labels::new()).await)?,
        Code::AlreadyExists
    );
    assert_eq!(code(node.status("default/10/layer").await)?, Code::NotFound);
    assert_eq!(node.read(&digest, 0, 0).await?, data);
    node.stop().await
}

#[tokio::test]
async fn a_second_writer_of_a_ref_is_unavailable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut first = node.writer("default/11/layer", 0, "").await?;
    first.write(b"abc").await?;
    let Err(second) = node.writer("default/11/layer", 0, "").await else {
        anyhow::bail!("two writers hold one ref");
    };
    assert_eq!(second.code(), Code::Unavailable);
    assert!(
        second.message().contains("ref default/11/layer locked"),
        "{}",
        second.message()
    );
    let mut other = node.writer("default/12/layer", 0, "").await?;
    other.write(b"other refs are free").await?;
    first.write(b"def").await?;
    let done = first.commit(6, "", Labels::new()).await?;
    assert_eq!(done.digest, Digest::of(b"abcdef").to_string());
    // An open conversation would hold up the server's graceful shutdown.
    drop(other);
    node.stop().await
}

#[tokio::test]
async fn abort_removes_the_ingest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let mut w = node.writer("default/13/layer", 0, "").await?;
    w.write(b"doomed").await?;
    drop(w);
    node.abort("default/13/layer").await?;
    assert_eq!(code(node.status("default/13/layer").await)?, Code::NotFound);
    assert!(node.statuses(&[]).await?.is_empty());
    assert_eq!(code(node.abort("default/13/layer").await)?, Code::NotFound);

    // Aborted under a live writer: its commit finds nothing to commit.
    let mut w = node.writer_when_free("default/14/layer").await?;
    w.write(b"also doomed").await?;
    node.abort("default/14/layer").await?;
    assert_eq!(code(w.commit(0, "", Labels::new()).await)?, Code::NotFound);
    assert!(node.list(&[]).await?.is_empty());
    node.stop().await
}

#[tokio::test]
async fn parallel_ingests_all_commit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let blobs: Vec<Vec<u8>> = (0..20)
        .map(|i| blob(200_000 + i * 1000, 100 + i as u64))
        .collect();
    let puts = blobs
        .iter()
        .enumerate()
        .map(|(i, data)| node.put_owned(format!("default/{}/layer", 100 + i), data.clone()));
    let mut committed = futures::future::try_join_all(puts).await?;
    committed.sort();
    let mut expected: Vec<String> = blobs.iter().map(|b| Digest::of(b).to_string()).collect();
    expected.sort();
    assert_eq!(committed, expected);
    assert_eq!(node.list(&[]).await?, expected);
    assert!(
        node.statuses(&[]).await?.is_empty(),
        "no ingest is left behind"
    );
    node.stop().await
}
