//! Malformed digests, refs, labels and actions each get their gRPC error, and no ref names a
//! path outside the store.

use containerd_client::services::v1 as api;
use tonic::Code;

use crate::harness::{Labels, Node, code, labels};

#[tokio::test]
async fn bad_input_is_an_invalid_argument() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path()).await?;
    let bad_digests = [
        "",
        "sha256:XYZ",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256:../../../../etc/passwd",
        &format!("sha256:{}", "A".repeat(64)),
    ];
    for d in bad_digests {
        assert_eq!(
            code(node.info(d).await)?,
            Code::InvalidArgument,
            "info {d:?}"
        );
        assert_eq!(
            code(node.read(d, 0, 0).await)?,
            Code::InvalidArgument,
            "read {d:?}"
        );
        assert_eq!(
            code(node.delete(d).await)?,
            Code::InvalidArgument,
            "delete {d:?}"
        );
        let update = node.update(d, Labels::new(), &[]).await;
        assert_eq!(code(update)?, Code::InvalidArgument, "update {d:?}");
    }
    let long = "r".repeat(2048);
    for r in ["", "a\0b", long.as_str()] {
        assert_eq!(
            code(node.status(r).await)?,
            Code::InvalidArgument,
            "status {r:?}"
        );
        assert_eq!(
            code(node.abort(r).await)?,
            Code::InvalidArgument,
            "abort {r:?}"
        );
        assert_eq!(
            code(node.writer(r, 0, "").await)?,
            Code::InvalidArgument,
            "write {r:?}"
        );
    }
    let bad_expected = node.writer("default/17/layer", 0, "sha256:nope").await;
    assert_eq!(code(bad_expected)?, Code::InvalidArgument);
    let mut w = node.writer("default/18/layer", 0, "").await?;
    w.write(b"x").await?;
    let huge = labels(&[("k", &"v".repeat(5000))]);
    assert_eq!(code(w.commit(1, "", huge).await)?, Code::InvalidArgument);
    let mut w = node.writer_when_free("default/18/layer").await?;
    let unknown_action = w.send(api::WriteContentRequest {
        action: 7,
        ..Default::default()
    });
    assert_eq!(code(unknown_action.await)?, Code::InvalidArgument);

    // A ref that looks like a path names nothing outside the ingest directory.
    let escape = node
        .put("../../../escape", b"payload", Labels::new())
        .await?;
    assert_eq!(node.read(&escape, 0, 0).await?, b"payload");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir.path())? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(names, ["content.redb", "shoal.sock", "store"]);
    assert!(
        !dir.path()
            .parent()
            .map(|p| p.join("escape").exists())
            .unwrap_or(false)
    );
    node.stop().await
}
