//! Committed blobs: read back whole and in ranges, Info, List filters, label updates, Delete,
//! a restart, and blobs that reached the store by another door.

use shoal_p2p::Digest;
use shoal_p2p::store::{BlobStore, StoreConfig};
use tonic::Code;

use crate::harness::{Labels, Node, blob, code, labels};

#[tokio::test]
async fn write_read_info_list_update_delete() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let data = blob((2 << 20) + 12345, 1);
    let digest = Digest::of(&data).to_string();

    let mut w = node.writer("default/1/layer", data.len(), &digest).await?;
    for chunk in data.chunks(300_000) {
        let resp = w.write(chunk).await?;
        assert_eq!(resp.total, data.len() as i64);
        assert!(resp.started_at.is_some() && resp.updated_at.is_some());
    }
    assert_eq!(node.statuses(&[]).await?, vec!["default/1/layer"]);
    let done = w
        .commit(data.len(), &digest, labels(&[("k", "v"), ("a", "1")]))
        .await?;
    assert_eq!(
        (done.offset, done.digest.as_str()),
        (data.len() as i64, digest.as_str())
    );
    assert_eq!(code(node.status("default/1/layer").await)?, Code::NotFound);

    assert_eq!(node.read(&digest, 0, 0).await?, data, "whole blob");
    assert_eq!(node.read(&digest, 1000, 5000).await?, &data[1000..6000]);
    assert_eq!(
        node.read(&digest, -5, 10).await?,
        &data[..10],
        "negative offset reads from 0"
    );
    assert_eq!(
        node.read(&digest, 2 << 20, 1 << 30).await?,
        &data[2 << 20..],
        "to the end"
    );
    assert!(node.read(&digest, data.len() as i64, 0).await?.is_empty());
    assert_eq!(
        code(node.read(&digest, data.len() as i64 + 1, 0).await)?,
        Code::OutOfRange
    );

    let info = node.info(&digest).await?;
    assert_eq!(info.size, data.len() as i64);
    assert_eq!(info.labels, labels(&[("k", "v"), ("a", "1")]));
    assert!(info.created_at.is_some());

    let other = node.put("default/2/config", b"{}", Labels::new()).await?;
    let mut both = vec![digest.clone(), other.clone()];
    both.sort();
    assert_eq!(node.list(&[]).await?, both);
    assert_eq!(node.list(&["labels.k==v"]).await?, vec![digest.clone()]);
    assert_eq!(
        node.list(&[r#"labels."k"==v,labels.a"#]).await?,
        vec![digest.clone()]
    );
    assert_eq!(
        node.list(&["labels.k==v,labels.a==2"]).await?,
        Vec::<String>::new()
    );
    assert_eq!(
        node.list(&[&format!("digest=={other}")]).await?,
        vec![other.clone()]
    );
    assert_eq!(
        node.list(&["labels.k==v", &format!("digest=={other}")])
            .await?,
        both
    );
    assert_eq!(
        code(node.list(&["labels.k=="]).await)?,
        Code::InvalidArgument
    );

    let set = node.update(
        &digest,
        labels(&[("b", "2"), ("k", "")]),
        &["labels.b", "labels.k"],
    );
    assert_eq!(set.await?, labels(&[("a", "1"), ("b", "2")]));
    let replaced = node
        .update(&digest, labels(&[("only", "x")]), &["labels"])
        .await?;
    assert_eq!(replaced, labels(&[("only", "x")]));
    assert_eq!(node.info(&digest).await?.labels, replaced);
    assert_eq!(
        node.update(&digest, labels(&[("z", "1")]), &[]).await?,
        labels(&[("z", "1")])
    );
    let bad_path = node.update(&digest, Labels::new(), &["size"]).await;
    assert_eq!(code(bad_path)?, Code::InvalidArgument);
    let huge = labels(&[("big", &"x".repeat(4094))]);
    assert_eq!(
        code(node.update(&digest, huge, &[]).await)?,
        Code::InvalidArgument
    );
    assert_eq!(
        node.info(&digest).await?.labels,
        labels(&[("z", "1")]),
        "nothing changed"
    );
    let missing = Digest::of(b"missing").to_string();
    assert_eq!(
        code(node.update(&missing, Labels::new(), &[]).await)?,
        Code::NotFound
    );

    node.delete(&digest).await?;
    assert_eq!(code(node.info(&digest).await)?, Code::NotFound);
    assert_eq!(code(node.read(&digest, 0, 0).await)?, Code::NotFound);
    assert_eq!(code(node.delete(&digest).await)?, Code::NotFound);
    assert_eq!(node.list(&[]).await?, vec![other]);
    node.stop().await
}

#[tokio::test]
async fn a_restart_keeps_blobs_labels_and_ingests() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let data = blob(700_000, 5);
    let digest = node
        .put("default/15/layer", &data, labels(&[("gc", "keep")]))
        .await?;
    let mut w = node.writer("default/16/layer", 1000, "").await?;
    w.write(&[7u8; 400]).await?;
    drop(w);
    node.stop().await?;

    let node = Node::start(dir.path()).await?;
    assert_eq!(node.info(&digest).await?.labels, labels(&[("gc", "keep")]));
    assert_eq!(node.read(&digest, 0, 0).await?, data);
    assert_eq!(node.list(&["labels.gc==keep"]).await?, vec![digest]);
    let status = node.status("default/16/layer").await?;
    assert_eq!((status.offset, status.total), (400, 1000));
    let mut w = node.writer("default/16/layer", 1000, "").await?;
    assert_eq!(w.offset, 400);
    w.write(&[7u8; 600]).await?;
    let done = w
        .commit(1000, &Digest::of(&[7u8; 1000]).to_string(), Labels::new())
        .await?;
    assert_eq!(node.read(&done.digest, 0, 0).await?, vec![7u8; 1000]);
    node.stop().await
}

#[tokio::test]
async fn blobs_from_other_doors_are_found_but_not_listed_until_asked_for() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = blob(10_000, 6);
    {
        // The swarm or the mirror put this blob in the store, not containerd.
        let store = BlobStore::open(&StoreConfig {
            root: dir.path().join("store"),
            capacity: 1 << 30,
        })?;
        let path = store.ingest_dir().join("from-the-swarm");
        std::fs::write(&path, &data)?;
        store.adopt(&path, None)?;
    }
    let node = Node::start(dir.path()).await?;
    let digest = Digest::of(&data).to_string();
    assert!(
        node.list(&[]).await?.is_empty(),
        "containerd's GC must not see it"
    );
    assert_eq!(node.info(&digest).await?.size, data.len() as i64);
    assert_eq!(
        node.list(&[]).await?,
        vec![digest.clone()],
        "containerd may now use it"
    );
    assert_eq!(node.read(&digest, 0, 0).await?, data);
    node.stop().await
}
