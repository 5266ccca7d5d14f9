//! Blob store behaviour: verification, durability across reopen, waiting readers, eviction.

use std::time::Duration;

use std::io::Write as _;

use super::*;
use crate::metainfo::PieceHash;

fn blob_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn open(dir: &Path, capacity: u64) -> Result<BlobStore> {
    BlobStore::open(&StoreConfig {
        root: dir.to_owned(),
        capacity,
    })
}

fn piece<'a>(meta: &Metainfo, data: &'a [u8], i: u32) -> &'a [u8] {
    let r = meta.piece_range(i);
    &data[r.start as usize..r.end as usize]
}

#[test]
fn pieces_are_verified_and_blob_completes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path(), u64::MAX)?;
    let data = blob_bytes((3 << 20) + 100, 1);
    let meta = Metainfo::of_bytes(Digest::of(&data), &data)?;
    let blob = store.open_blob(&meta)?;

    let mut bad = piece(&meta, &data, 1).to_vec();
    bad[5] ^= 1;
    assert!(matches!(
        blob.write_piece(1, &bad, false),
        Err(StoreError::PieceMismatch { index: 1, .. })
    ));
    assert!(!blob.has_piece(1));
    assert!(matches!(
        blob.write_piece(1, &bad[1..], false),
        Err(StoreError::PieceLength { .. })
    ));
    assert!(blob.write_piece(9, &bad, false).is_err());

    for i in [3, 0, 2] {
        assert_eq!(
            blob.write_piece(i, piece(&meta, &data, i), false)?,
            PieceWrite::Added
        );
    }
    assert_eq!(
        blob.write_piece(0, piece(&meta, &data, 0), false)?,
        PieceWrite::Duplicate
    );
    let mut buf = vec![0u8; 10];
    assert!(matches!(
        blob.read_at((1 << 20) - 5, &mut buf),
        Err(StoreError::Missing { .. })
    ));
    blob.read_at(5, &mut buf)?;
    assert_eq!(buf, data[5..15]);
    assert!(!blob.is_complete());
    blob.write_piece(1, piece(&meta, &data, 1), false)?;
    assert!(blob.is_complete());
    assert_eq!(
        std::fs::read(dir.path().join("blobs").join(meta.digest.hex()))?,
        data
    );
    assert!(!dir.path().join("partial").join(meta.digest.hex()).exists());
    Ok(())
}

#[test]
fn partial_blob_resumes_after_reopen() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = blob_bytes(5 << 20, 2);
    let meta = Metainfo::of_bytes(Digest::of(&data), &data)?;
    {
        let store = open(dir.path(), u64::MAX)?;
        let blob = store.open_blob(&meta)?;
        blob.write_piece(0, piece(&meta, &data, 0), false)?;
        blob.write_piece(3, piece(&meta, &data, 3), false)?;
    }
    // A torn journal append, as a crash would leave it.
    let journal = dir
        .path()
        .join("partial")
        .join(meta.digest.hex())
        .join("pieces");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)?
        .write_all(&[4, 0])?;

    let store = open(dir.path(), u64::MAX)?;
    let blob = store
        .get(&meta.digest)
        .ok_or_else(|| anyhow::anyhow!("partial blob lost"))?;
    assert_eq!(blob.have().iter_ones().collect::<Vec<_>>(), vec![0, 3]);
    blob.learn_hashes(&meta)?;
    for i in [1, 2, 4] {
        blob.write_piece(i, piece(&meta, &data, i), false)?;
    }
    assert!(blob.is_complete());
    drop(blob);
    let store = open(dir.path(), u64::MAX)?;
    let blob = store
        .get(&meta.digest)
        .ok_or_else(|| anyhow::anyhow!("complete blob lost"))?;
    assert!(blob.is_complete());
    assert_eq!(blob.read_piece(4)?, piece(&meta, &data, 4));
    Ok(())
}

#[test]
fn unknown_hashes_are_held_back_unless_from_upstream() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path(), u64::MAX)?;
    let data = blob_bytes(2 << 20, 3);
    let digest = Digest::of(&data);
    let blob = store.open_blob(&Metainfo::empty(digest, data.len() as u64)?)?;
    let p0 = &data[..1 << 20];
    assert_eq!(blob.write_piece(0, p0, false)?, PieceWrite::HashUnknown);
    assert_eq!(blob.write_piece(0, p0, true)?, PieceWrite::Added);
    assert_eq!(blob.metainfo().pieces[0], Some(PieceHash::of(p0)));
    Ok(())
}

#[test]
fn a_streamed_piece_is_invisible_until_committed_and_claimed_meanwhile() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path(), u64::MAX)?;
    let data = blob_bytes((2 << 20) + 7, 5);
    let meta = Metainfo::of_bytes(Digest::of(&data), &data)?;
    let blob = store.open_blob(&Metainfo::empty(meta.digest, meta.size)?)?;
    let p1 = piece(&meta, &data, 1);

    let mut writer = blob
        .piece_writer(1)?
        .ok_or_else(|| anyhow::anyhow!("piece 1 not free"))?;
    assert_eq!(writer.len(), p1.len());
    // A broken first attempt, then the whole piece in uneven blocks.
    writer.write(&[0xaa; 1000])?;
    writer.restart();
    for block in p1.chunks(300_000) {
        writer.write(block)?;
        assert!(!blob.has_piece(1));
    }
    assert!(writer.write(b"x").is_err(), "more than the piece");
    // Nobody else writes the piece while it is claimed.
    assert!(blob.piece_writer(1)?.is_none());
    assert_eq!(blob.write_piece(1, p1, true)?, PieceWrite::Duplicate);
    // Its hash is not known yet: the claim and the bytes stay.
    assert_eq!(writer.commit(false)?, PieceWrite::HashUnknown);
    assert!(!blob.has_piece(1) && blob.piece_writer(1)?.is_none());
    let mut buf = vec![0u8; 10];
    assert!(matches!(
        blob.read_at(meta.piece_range(1).start, &mut buf),
        Err(StoreError::Missing { .. })
    ));
    blob.learn_hashes(&meta)?;
    assert_eq!(writer.commit(false)?, PieceWrite::Added);
    assert_eq!(writer.hash(), meta.pieces[1]);
    blob.read_at(meta.piece_range(1).start, &mut buf)?;
    assert_eq!(buf, p1[..10]);

    // A bad piece releases its claim, so a good copy can follow; a dropped writer too.
    let mut bad = blob
        .piece_writer(0)?
        .ok_or_else(|| anyhow::anyhow!("piece 0 not free"))?;
    bad.write(&vec![0u8; bad.len()])?;
    assert!(matches!(
        bad.commit(false),
        Err(StoreError::PieceMismatch { index: 0, .. })
    ));
    drop(blob.piece_writer(0)?);
    let mut short = blob
        .piece_writer(0)?
        .ok_or_else(|| anyhow::anyhow!("piece 0 not released"))?;
    short.write(&piece(&meta, &data, 0)[..5])?;
    assert!(matches!(
        short.commit(false),
        Err(StoreError::PieceLength { got: 5, .. })
    ));
    assert!(!blob.has_piece(0));
    for i in [0, 2] {
        assert_eq!(
            blob.write_piece(i, piece(&meta, &data, i), false)?,
            PieceWrite::Added
        );
    }
    assert!(blob.is_complete());
    assert!(blob.piece_writer(0)?.is_none());
    Ok(())
}

#[test]
fn blob_failing_its_digest_is_discarded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path(), u64::MAX)?;
    let data = blob_bytes(2 << 20, 4);
    let wrong_digest = Digest::of(b"something else");
    let blob = store.open_blob(&Metainfo::empty(wrong_digest, data.len() as u64)?)?;
    blob.write_piece(0, &data[..1 << 20], true)?;
    let res = blob.write_piece(1, &data[1 << 20..], true);
    assert!(
        matches!(res, Err(StoreError::DigestMismatch { .. })),
        "{res:?}"
    );
    assert_eq!(blob.state(), BlobState::Discarded);
    assert!(store.get(&wrong_digest).is_none());
    assert!(!dir.path().join("partial").join(wrong_digest.hex()).exists());
    assert!(!dir.path().join("blobs").join(wrong_digest.hex()).exists());
    Ok(())
}

#[tokio::test]
async fn the_digest_check_covers_pieces_hashed_as_they_arrived() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path(), u64::MAX)?;
    let data = blob_bytes((4 << 20) + 7, 6);
    let digest = Digest::of(&data);
    let layout = Metainfo::empty(digest, data.len() as u64)?;
    // In order, as a streaming reader gets them: the first pieces are hashed into the blob's
    // digest as they land, and a bad one among them (upstream bytes define their own piece
    // hash) must still fail the blob when its last piece arrives.
    let good = store.open_blob(&layout)?;
    let bad = {
        let dir = tempfile::tempdir()?;
        let store = open(dir.path(), u64::MAX)?;
        let bad = store.open_blob(&layout)?;
        let mut wrong = piece(&layout, &data, 0).to_vec();
        wrong[3] ^= 0x40;
        bad.write_piece(0, &wrong, true)?;
        for i in 1..4 {
            bad.write_piece(i, piece(&layout, &data, i), true)?;
        }
        let last = layout.piece_range(4);
        let waiter = tokio::spawn({
            let bad = bad.clone();
            async move { bad.wait_range(last).await }
        });
        let res = bad.write_piece(4, piece(&layout, &data, 4), true);
        assert!(
            matches!(res, Err(StoreError::DigestMismatch { .. })),
            "{res:?}"
        );
        assert!(!bad.has_piece(4), "the last piece was never visible");
        let read = tokio::time::timeout(Duration::from_secs(5), waiter).await??;
        assert!(
            matches!(read, Err(StoreError::Discarded { .. })),
            "{read:?}"
        );
        bad.state()
    };
    assert_eq!(bad, BlobState::Discarded);
    // The same pieces, right, and the last one in the middle: the check carries the prefix
    // hash on from there.
    for i in [0, 1, 3, 4] {
        good.write_piece(i, piece(&layout, &data, i), true)?;
    }
    assert!(!good.has_piece(2));
    assert_eq!(
        good.write_piece(2, piece(&layout, &data, 2), true)?,
        PieceWrite::Added
    );
    assert!(good.is_complete());
    assert_eq!(good.metainfo(), Metainfo::of_bytes(digest, &data)?);
    let mut all = vec![0u8; data.len()];
    good.read_at(0, &mut all)?;
    assert_eq!(all, data);
    Ok(())
}

#[tokio::test]
async fn readers_wait_for_their_range() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path(), u64::MAX)?;
    let data = blob_bytes(3 << 20, 5);
    let meta = Metainfo::of_bytes(Digest::of(&data), &data)?;
    let blob = store.open_blob(&meta)?;
    let waiter = tokio::spawn({
        let blob = blob.clone();
        async move { blob.wait_range((1 << 20) + 1..(2 << 20) + 1).await }
    });
    blob.write_piece(1, piece(&meta, &data, 1), false)?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished(), "reader woke before piece 2 arrived");
    blob.write_piece(2, piece(&meta, &data, 2), false)?;
    tokio::time::timeout(Duration::from_secs(5), waiter).await???;
    Ok(())
}

#[test]
fn unused_blobs_are_evicted_oldest_first() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path(), 5 << 20)?;
    let mut metas = Vec::new();
    for seed in 0..3u8 {
        let data = blob_bytes(2 << 20, 10 + seed);
        let meta = Metainfo::of_bytes(Digest::of(&data), &data)?;
        let blob = store.open_blob(&meta)?;
        for i in 0..2 {
            blob.write_piece(i, piece(&meta, &data, i), false)?;
        }
        metas.push(meta);
    }
    // 6 MiB wanted, 5 MiB allowed: the first blob went when the third arrived.
    assert!(store.get(&metas[0].digest).is_none());
    let held = store
        .get(&metas[1].digest)
        .ok_or_else(|| anyhow::anyhow!("blob 1 evicted"))?;
    let data = blob_bytes(2 << 20, 20);
    store.open_blob(&Metainfo::of_bytes(Digest::of(&data), &data)?)?;
    // Blob 1 is held by a handle, so blob 2 is evicted instead.
    assert!(store.get(&metas[2].digest).is_none());
    assert!(held.is_complete());
    assert_eq!(store.complete_blobs(), vec![metas[1].digest]);
    Ok(())
}

#[test]
fn finished_files_are_adopted_without_a_copy() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path(), u64::MAX)?;
    let data = blob_bytes((2 << 20) + 7, 9);
    let digest = Digest::of(&data);
    let ingest = store.ingest_dir().join("upload");
    std::fs::write(&ingest, &data)?;
    let wrong = Digest::of(b"not it");
    assert!(matches!(
        store.adopt(&ingest, Some(wrong)),
        Err(StoreError::DigestMismatch { .. })
    ));
    assert!(
        ingest.exists(),
        "a refused ingest stays for the writer to fix or abort"
    );
    let blob = store.adopt(&ingest, Some(digest))?;
    assert!(blob.is_complete() && !ingest.exists());
    assert_eq!(blob.read_piece(2)?, data[2 << 20..]);
    assert_eq!(blob.metainfo(), Metainfo::of_bytes(digest, &data)?);
    // The same content again is stored once.
    std::fs::write(&ingest, &data)?;
    store.adopt(&ingest, None)?;
    assert_eq!(store.complete_blobs(), vec![digest]);
    drop(blob);
    let reopened = open(dir.path(), u64::MAX)?;
    assert!(reopened.get(&digest).is_some_and(|b| b.is_complete()));
    Ok(())
}

#[test]
fn list_reports_complete_and_partial_blobs_in_digest_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path(), u64::MAX)?;
    let full = blob_bytes(3 << 20, 5);
    let full_meta = Metainfo::of_bytes(Digest::of(&full), &full)?;
    let part = blob_bytes((2 << 20) + 7, 6);
    let part_meta = Metainfo::of_bytes(Digest::of(&part), &part)?;
    {
        let blob = store.open_blob(&full_meta)?;
        for i in 0..full_meta.piece_count() {
            blob.write_piece(i, piece(&full_meta, &full, i), false)?;
        }
        let blob = store.open_blob(&part_meta)?;
        blob.write_piece(1, piece(&part_meta, &part, 1), false)?;
    }
    let listed: Vec<_> = store
        .list()
        .iter()
        .map(|b| {
            (
                b.digest(),
                b.size(),
                b.have().count(),
                b.have().len(),
                b.is_complete(),
            )
        })
        .collect();
    let mut want = vec![
        (
            full_meta.digest,
            full_meta.size,
            full_meta.piece_count(),
            full_meta.piece_count(),
            true,
        ),
        (
            part_meta.digest,
            part_meta.size,
            1,
            part_meta.piece_count(),
            false,
        ),
    ];
    want.sort();
    assert_eq!(listed, want);
    Ok(())
}
