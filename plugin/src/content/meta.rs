//! What the content store knows about a blob beyond its bytes: when containerd first committed
//! (or adopted) it, when its labels last changed, and the labels. One redb table,
//! `content`: digest hex → JSON [`Record`].
//!
//! redb rather than a JSON file per digest: every change is one transaction made durable by
//! redb's default `Durability::Immediate` (no temp-file, rename and directory fsync dance per
//! label update), `List` is one ordered scan instead of opening thousands of files, and the
//! snapshotter already keeps its metadata the same way, so a node has one kind of metadata
//! store to reason about after a crash.
//!
//! A record also means "containerd owns this blob": it is listed by `List` (which containerd's
//! garbage collector walks) and kept from eviction. Blobs the swarm or FUSE hold for their own
//! reasons have no record, so containerd's collector never sees, nor deletes, them.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shoal_p2p::Digest;

use super::{Error, Info, Labels};
use crate::meta::{now, time};

const CONTENT: TableDefinition<&str, &[u8]> = TableDefinition::new("content");

/// One blob's metadata as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Nanoseconds since the Unix epoch.
    pub created: u64,
    pub updated: u64,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

impl Record {
    pub fn new(labels: Labels) -> Self {
        let now = now();
        Record {
            created: now,
            updated: now,
            labels,
        }
    }

    pub fn info(&self, digest: Digest, size: u64) -> Info {
        Info {
            digest,
            size,
            created: time(self.created),
            updated: time(self.updated),
            labels: self.labels.clone(),
        }
    }
}

fn decode(key: &str, value: &[u8]) -> Result<Record, Error> {
    serde_json::from_slice(value).map_err(|e| Error::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn encode(record: &Record) -> Vec<u8> {
    // A struct of integers and a string map always serializes.
    serde_json::to_vec(record).unwrap_or_default()
}

/// The open metadata database. Its methods block (a write waits for fsync): call them from
/// `spawn_blocking` in async code.
#[derive(Debug)]
pub(crate) struct MetaStore {
    db: Database,
}

impl MetaStore {
    pub fn open(path: &Path) -> Result<Self, Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
        }
        let db = Database::create(path)?;
        // Create the table once, so read transactions always find it.
        let txn = db.begin_write()?;
        txn.open_table(CONTENT)?;
        txn.commit()?;
        Ok(MetaStore { db })
    }

    pub fn get(&self, digest: &Digest) -> Result<Option<Record>, Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONTENT)?;
        let key = digest.hex();
        match table.get(key.as_str())? {
            Some(v) => decode(&key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every record, in digest order.
    pub fn all(&self) -> Result<Vec<(Digest, Record)>, Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONTENT)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let key = key.value();
            let digest = Digest::from_hex(key).map_err(|e| Error::Corrupt {
                key: key.to_owned(),
                reason: e.to_string(),
            })?;
            out.push((digest, decode(key, value.value())?));
        }
        Ok(out)
    }

    /// The record of `digest`, made with `labels` if there is none yet (then `true`).
    pub fn get_or_insert(&self, digest: &Digest, labels: Labels) -> Result<(Record, bool), Error> {
        let key = digest.hex();
        let new = Record::new(labels);
        let txn = self.db.begin_write()?;
        let existing = {
            let mut table = txn.open_table(CONTENT)?;
            let existing = match table.get(key.as_str())? {
                Some(v) => Some(decode(&key, v.value())?),
                None => None,
            };
            if existing.is_none() {
                table.insert(key.as_str(), encode(&new).as_slice())?;
            }
            existing
        };
        match existing {
            // Nothing changed: dropping the transaction aborts it.
            Some(record) => Ok((record, false)),
            None => {
                txn.commit()?;
                Ok((new, true))
            }
        }
    }

    /// Applies `change` to the record of `digest` (a fresh one if missing) and stores it.
    pub fn modify(
        &self,
        digest: &Digest,
        change: impl FnOnce(&mut Record) -> Result<(), Error>,
    ) -> Result<Record, Error> {
        let key = digest.hex();
        let txn = self.db.begin_write()?;
        let record = {
            let mut table = txn.open_table(CONTENT)?;
            let mut record = match table.get(key.as_str())? {
                Some(v) => decode(&key, v.value())?,
                None => Record::new(Labels::new()),
            };
            change(&mut record)?;
            table.insert(key.as_str(), encode(&record).as_slice())?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// Forgets `digests`; returns how many had a record.
    pub fn remove(&self, digests: &[Digest]) -> Result<usize, Error> {
        let txn = self.db.begin_write()?;
        let mut removed = 0;
        {
            let mut table = txn.open_table(CONTENT)?;
            for digest in digests {
                if table.remove(digest.hex().as_str())?.is_some() {
                    removed += 1;
                }
            }
        }
        txn.commit()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("content.redb");
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        {
            let meta = MetaStore::open(&path)?;
            let labels = Labels::from([("k".to_owned(), "v".to_owned())]);
            let (record, new) = meta.get_or_insert(&a, labels.clone())?;
            assert!(new);
            assert_eq!(record.labels, labels);
            let (again, new) = meta.get_or_insert(&a, Labels::new())?;
            assert!(!new);
            assert_eq!(again, record, "an existing record is kept as it is");
            meta.modify(&b, |r| {
                r.labels.insert("x".to_owned(), "y".to_owned());
                Ok(())
            })?;
        }
        let meta = MetaStore::open(&path)?;
        let all = meta.all()?;
        assert_eq!(all.len(), 2);
        assert_eq!(meta.get(&b)?.map(|r| r.labels.len()), Some(1));
        assert_eq!(meta.remove(&[a, a, Digest::of(b"c")])?, 1);
        assert_eq!(meta.get(&a)?, None);
        Ok(())
    }
}
