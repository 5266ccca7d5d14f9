//! Bad keys, names, parents and labels get their gRPC code; nothing lands outside the root; the
//! service keeps serving.

use std::fs;
use std::path::Path;

use tonic::Code;

use crate::harness::{Labels, Server, code, labels};

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for entry in fs::read_dir(&p)? {
            let path = entry?.path();
            out.push(path.strip_prefix(dir)?.display().to_string());
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[tokio::test]
async fn bad_input_gets_clean_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    c.layer("base", "").await?;
    c.prepare("active", "base", Labels::new()).await?;
    c.view("view", "base", Labels::new()).await?;
    let none = Labels::new;

    // Keys and names.
    for key in ["", "a\0b", &"k".repeat(4097)] {
        assert_eq!(
            code(c.prepare(key, "", none()).await)?,
            Code::InvalidArgument
        );
        assert_eq!(code(c.view(key, "", none()).await)?, Code::InvalidArgument);
    }
    assert_eq!(
        code(c.commit("n\0", "active", none()).await)?,
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.commit("", "active", none()).await)?,
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.prepare("k", "base\0", none()).await)?,
        Code::InvalidArgument
    );
    for key in ["", "a\0b", "../../etc/passwd"] {
        assert_eq!(code(c.stat(key).await)?, Code::NotFound);
        assert_eq!(code(c.mounts(key).await)?, Code::NotFound);
        assert_eq!(code(c.usage(key).await)?, Code::NotFound);
        assert_eq!(code(c.remove(key).await)?, Code::NotFound);
    }

    // Parents.
    assert_eq!(
        code(c.prepare("k", "missing", none()).await)?,
        Code::NotFound
    );
    assert_eq!(code(c.view("k", "missing", none()).await)?, Code::NotFound);
    assert_eq!(
        code(c.prepare("k", "active", none()).await)?,
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.view("k", "view", none()).await)?,
        Code::InvalidArgument
    );

    // Labels: at most 4096 bytes of key and value each, at most 256 of them.
    let big = labels(&[("k", &"v".repeat(4096))]);
    assert_eq!(
        code(c.prepare("k", "", big.clone()).await)?,
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.commit("k", "active", big.clone()).await)?,
        Code::InvalidArgument
    );
    let many: Labels = (0..257)
        .map(|i| (format!("l{i}"), "v".to_owned()))
        .collect();
    assert_eq!(code(c.view("k", "", many).await)?, Code::InvalidArgument);
    let mut info = c.stat("base").await?;
    info.labels = big;
    assert_eq!(
        code(c.update(Some(info.clone()), &[]).await)?,
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.update(Some(info), &["labels.k"]).await)?,
        Code::InvalidArgument
    );
    let fits = labels(&[("k", &"v".repeat(4095))]);
    c.prepare("fits", "", fits.clone()).await?;
    assert_eq!(c.stat("fits").await?.labels, fits);
    // An empty value means no label, as in containerd's stores.
    c.prepare("empty-label", "", labels(&[("gone", ""), ("kept", "1")]))
        .await?;
    assert_eq!(
        c.stat("empty-label").await?.labels,
        labels(&[("kept", "1")])
    );

    // Keys that look like paths are only keys.
    let before = tree(dir.path())?;
    c.prepare("../../escape", "", none()).await?;
    c.commit("/etc/../../escape-committed", "../../escape", none())
        .await?;
    c.view("./..", "/etc/../../escape-committed", none())
        .await?;
    let mut after = tree(dir.path())?;
    after.retain(|p| !before.contains(p));
    assert!(
        after.iter().all(|p| p.starts_with("root/snapshots/")),
        "{after:?}"
    );
    assert!(
        !dir.path().join("escape").exists()
            && !dir
                .path()
                .parent()
                .is_some_and(|p| p.join("escape").exists())
    );

    // Nothing of the above disturbed what was there, and the service still answers.
    assert_eq!(c.stat("active").await?.parent, "base");
    assert_eq!(
        c.list(&[]).await?,
        [
            "./..",
            "/etc/../../escape-committed",
            "active",
            "base",
            "empty-label",
            "fits",
            "view"
        ]
    );
    s.stop(c).await
}
