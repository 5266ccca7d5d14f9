//! Stat, Update with field masks and List with containerd's filters, after containerd's
//! `checkUpdate` and `checkWalk`.

use std::time::SystemTime;

use containerd_client::services::v1::snapshots::Info;
use tonic::Code;

use crate::harness::{Client, Labels, Server, code, labels};

/// containerd's `baseTestSnapshots`.
async fn base_snapshots(c: &mut Client) -> anyhow::Result<()> {
    c.layer("c1", "").await?;
    c.layer("c2", "c1").await?;
    c.prepare("a1", "c2", Labels::new()).await?;
    c.prepare("a2", "", Labels::new()).await?;
    c.view("v1", "c2", Labels::new()).await?;
    c.view("v2", "", Labels::new()).await?;
    Ok(())
}

fn time(t: Option<prost_types::Timestamp>) -> anyhow::Result<SystemTime> {
    let t = t.ok_or_else(|| anyhow::anyhow!("no timestamp"))?;
    Ok(SystemTime::try_from(t)?)
}

#[tokio::test]
async fn update_follows_field_masks() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    let t1 = SystemTime::now();
    base_snapshots(&mut c).await?;
    let t2 = SystemTime::now();
    for (name, kind, parent) in [
        ("c1", 3, ""),
        ("c2", 3, "c1"),
        ("a1", 2, "c2"),
        ("a2", 2, ""),
        ("v1", 1, "c2"),
        ("v2", 1, ""),
    ] {
        let st = c.stat(name).await?;
        let created = time(st.created_at)?;
        assert!(
            t1 <= created && created <= t2,
            "{name}: created {created:?}"
        );
        assert_eq!(st.created_at, st.updated_at, "{name}");
        assert_eq!(
            (st.name.as_str(), st.kind, st.parent.as_str()),
            (name, kind, parent)
        );

        // No mask: all labels replaced; the parent is not a field one can change.
        let expected = labels(&[
            ("l1", "v1"),
            ("l2", "v2"),
            ("l3", "v3"),
            ("containerd.io/gc.root", "t"),
        ]);
        let u1 = SystemTime::now();
        let asked = Info {
            parent: "doesnotexist".to_owned(),
            labels: expected.clone(),
            ..st.clone()
        };
        let updated = c.update(Some(asked.clone()), &[]).await?;
        assert_eq!(updated.labels, expected);
        assert_eq!(updated.created_at, st.created_at, "{name}");
        assert!(time(updated.updated_at)? >= u1);
        assert_eq!((updated.kind, updated.parent.as_str()), (kind, parent));
        assert_eq!(c.stat(name).await?, updated);

        // Label paths: set l1, delete l2 (absent from the request), leave the rest.
        let asked = Info {
            labels: labels(&[("l1", "updated"), ("l4", "v4")]),
            ..asked
        };
        let updated = c
            .update(Some(asked.clone()), &["labels.l1", "labels.l2"])
            .await?;
        let expected = labels(&[
            ("l1", "updated"),
            ("l3", "v3"),
            ("containerd.io/gc.root", "t"),
        ]);
        assert_eq!(updated.labels, expected);

        // "labels": replace them all.
        let expected = labels(&[("l4", "v4"), ("containerd.io/gc.root", "t")]);
        let asked = Info {
            labels: expected.clone(),
            ..asked
        };
        assert_eq!(
            c.update(Some(asked.clone()), &["labels"]).await?.labels,
            expected
        );

        assert_eq!(
            code(c.update(Some(asked.clone()), &["parent"]).await)?,
            Code::InvalidArgument
        );
        assert_eq!(
            code(c.update(Some(asked), &["labels.x", "name"]).await)?,
            Code::InvalidArgument
        );
        assert_eq!(
            c.stat(name).await?.labels,
            expected,
            "a refused update changes nothing"
        );
    }
    assert_eq!(code(c.update(None, &[]).await)?, Code::InvalidArgument);
    let missing = Info {
        name: "missing".to_owned(),
        ..Info::default()
    };
    assert_eq!(code(c.update(Some(missing), &[]).await)?, Code::NotFound);
    s.stop(c).await
}

#[tokio::test]
async fn list_filters_like_containerd_walk() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    let root = ("containerd.io/gc.root", "check-walk");
    let gc = || labels(&[root]);
    c.prepare("a-np", "", gc()).await?;
    c.prepare("p-tmp", "", gc()).await?;
    c.commit("p", "p-tmp", gc()).await?;
    c.prepare("a", "p", gc()).await?;
    c.view("v", "p", gc()).await?;
    c.prepare("p-wl-tmp", "", gc()).await?;
    c.commit("p-wl", "p-wl-tmp", labels(&[("l", "1"), root]))
        .await?;
    c.prepare("a-wl", "p-wl", labels(&[("l", "2"), root]))
        .await?;
    c.view("v-wl", "p-wl", labels(&[("l", "3"), root])).await?;
    c.prepare("a-np-wl", "", labels(&[("l", "2"), root]))
        .await?;
    c.prepare("unlabelled", "", Labels::new()).await?;

    let cases: &[(&[&str], &[&str])] = &[
        (
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
            &["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"],
        ),
        (
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
            &["a", "a-np", "a-np-wl", "a-wl"],
        ),
        (
            &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
            &["v", "v-wl"],
        ),
        (
            &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
            &["p", "p-wl"],
        ),
        (&["name==p", "name==a-np-wl"], &["a-np-wl", "p"]),
        (&["name==a-wl,labels.l"], &["a-wl"]),
        (&["parent==p"], &["a", "v"]),
        (
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
            &["a", "a-wl", "v", "v-wl"],
        ),
        (&["labels.l"], &["a-np-wl", "a-wl", "p-wl", "v-wl"]),
        (&["labels.l==2"], &["a-np-wl", "a-wl"]),
        (&["name~=^a-np"], &["a-np", "a-np-wl"]),
        (&["name==nothing"], &[]),
    ];
    for (filters, expected) in cases {
        assert_eq!(c.list(filters).await?, *expected, "{filters:?}");
    }
    assert_eq!(
        c.list(&[]).await?.len(),
        9,
        "the eight above and one unlabelled"
    );
    for bad in ["name=p", "labels.\"x", "name~=(", "kind==active ,name==a"] {
        assert_eq!(code(c.list(&[bad]).await)?, Code::InvalidArgument, "{bad}");
    }
    let infos: Vec<Info> = c.list_batches(&["name==a-wl"]).await?.concat();
    assert_eq!(
        infos,
        vec![c.stat("a-wl").await?],
        "List reports what Stat does"
    );
    s.stop(c).await
}

#[tokio::test]
async fn list_streams_in_batches_of_100() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    for i in 0..230 {
        c.view(&format!("v{i:03}"), "", Labels::new()).await?;
    }
    let sizes: Vec<usize> = c.list_batches(&[]).await?.iter().map(Vec::len).collect();
    assert_eq!(sizes, [100, 100, 30]);
    assert!(c.list_batches(&["name==none"]).await?.is_empty());
    s.stop(c).await
}
