//! Snapshot metadata in a redb database: the equivalent of containerd's
//! `core/snapshots/storage` bolt store, with the same rules (parents must be committed, keys and
//! names share one space, a snapshot with children cannot go, commit keeps the id).
//!
//! Three tables:
//! - `snapshots`: key or name → JSON [`Record`] (id, kind, parent name, times, labels, usage);
//! - `children`: (parent id, child id) → child key, so "has children?" is one range look-up;
//! - `sequence`: the last id handed out. Ids only grow, so a directory name is never reused.
//!
//! Every change happens in one write transaction that [`Writer::commit`] makes durable (redb's
//! default `Durability::Immediate`); the caller orders its directory changes around it.

use std::collections::HashSet;
use std::path::Path;

use redb::{Database, ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{Error, Info, Kind, Labels, Usage, validate_labels};
use crate::filters::Filter;
use crate::labels::LabelUpdate;
use crate::meta::{now, time};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: TableDefinition<(u64, u64), &str> = TableDefinition::new("children");
const SEQUENCE: TableDefinition<&str, u64> = TableDefinition::new("sequence");
const LAST_ID: &str = "last_id";

/// Longest parent chain followed before the metadata is declared corrupt (a cycle cannot be
/// made through the API).
const MAX_DEPTH: usize = 1 << 16;

/// One snapshot as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    pub id: u64,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent: String,
    /// Nanoseconds since the Unix epoch.
    pub created: u64,
    pub updated: u64,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub inodes: i64,
}

impl Record {
    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_owned(),
            parent: self.parent.clone(),
            kind: self.kind,
            created: time(self.created),
            updated: time(self.updated),
            labels: self.labels.clone(),
        }
    }

    pub fn usage(&self) -> Usage {
        Usage {
            size: self.size,
            inodes: self.inodes,
        }
    }
}

/// What mounts are made from: the snapshot's id and kind, and its parents' ids nearest first.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub id: u64,
    pub kind: Kind,
    pub parent_ids: Vec<u64>,
}

fn decode(key: &str, value: &[u8]) -> Result<Record, Error> {
    serde_json::from_slice(value).map_err(|e| Error::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn get(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>, Error> {
    t.get(key)?.map(|v| decode(key, v.value())).transpose()
}

fn must_get(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Record, Error> {
    get(t, key)?.ok_or_else(|| Error::NotFound(key.to_owned()))
}

/// Ids of `parent` and its ancestors, nearest first.
fn parent_ids(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    parent: &str,
) -> Result<Vec<u64>, Error> {
    let mut ids = Vec::new();
    let mut next = parent.to_owned();
    while !next.is_empty() {
        let record = get(t, &next)?.ok_or_else(|| Error::ParentNotFound(next.clone()))?;
        ids.push(record.id);
        if ids.len() > MAX_DEPTH {
            return Err(Error::Corrupt {
                key: parent.to_owned(),
                reason: "parent chain does not end".to_owned(),
            });
        }
        next = record.parent;
    }
    Ok(ids)
}

fn snapshot_of(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Snapshot, Error> {
    let record = must_get(t, key)?;
    if record.kind == Kind::Committed {
        return Err(Error::WrongKind {
            key: key.to_owned(),
            kind: record.kind,
            wanted: "not active or a view",
        });
    }
    Ok(Snapshot {
        id: record.id,
        kind: record.kind,
        parent_ids: parent_ids(t, &record.parent)?,
    })
}

fn ids(t: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<HashSet<u64>, Error> {
    let mut ids = HashSet::new();
    for entry in t.iter()? {
        let (key, value) = entry?;
        ids.insert(decode(key.value(), value.value())?.id);
    }
    Ok(ids)
}

/// The open metadata database.
#[derive(Debug)]
pub(crate) struct MetaStore {
    db: Database,
}

impl MetaStore {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let db = Database::create(path)?;
        // Create the tables once, so read transactions always find them.
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_table(CHILDREN)?;
        txn.open_table(SEQUENCE)?;
        txn.commit()?;
        Ok(MetaStore { db })
    }

    pub fn read(&self) -> Result<Reader, Error> {
        Ok(Reader {
            txn: self.db.begin_read()?,
        })
    }

    /// Starts the one write transaction that may exist at a time; others wait for it.
    pub fn write(&self) -> Result<Writer, Error> {
        Ok(Writer {
            txn: self.db.begin_write()?,
        })
    }
}

/// A consistent read-only view of the metadata.
pub(crate) struct Reader {
    txn: ReadTransaction,
}

impl Reader {
    pub fn get(&self, key: &str) -> Result<Record, Error> {
        must_get(&self.txn.open_table(SNAPSHOTS)?, key)
    }

    /// The mountable description of an active snapshot or view.
    pub fn snapshot(&self, key: &str) -> Result<Snapshot, Error> {
        snapshot_of(&self.txn.open_table(SNAPSHOTS)?, key)
    }

    pub fn list(&self, filter: &Filter) -> Result<Vec<Info>, Error> {
        let table = self.txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let key = key.value();
            let info = decode(key, value.value())?.info(key);
            if filter.matches(&info) {
                out.push(info);
            }
        }
        Ok(out)
    }
}

/// A write transaction; nothing it did is visible or durable until [`Writer::commit`].
pub(crate) struct Writer {
    txn: WriteTransaction,
}

impl Writer {
    pub fn commit(self) -> Result<(), Error> {
        Ok(self.txn.commit()?)
    }

    /// Ids of all snapshots, for cleanup.
    pub fn ids(&self) -> Result<HashSet<u64>, Error> {
        ids(&self.txn.open_table(SNAPSHOTS)?)
    }

    /// Adds an active snapshot or view `key` on the committed `parent`, with a fresh id.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Snapshot, Error> {
        debug_assert!(kind != Kind::Committed);
        let mut snapshots = self.txn.open_table(SNAPSHOTS)?;
        let mut chain = Vec::new();
        if !parent.is_empty() {
            let p =
                get(&snapshots, parent)?.ok_or_else(|| Error::ParentNotFound(parent.to_owned()))?;
            if p.kind != Kind::Committed {
                return Err(Error::ParentNotCommitted {
                    parent: parent.to_owned(),
                    kind: p.kind,
                });
            }
            chain = parent_ids(&snapshots, parent)?;
        }
        if snapshots.get(key)?.is_some() {
            return Err(Error::AlreadyExists(key.to_owned()));
        }

        let mut sequence = self.txn.open_table(SEQUENCE)?;
        let last = sequence.get(LAST_ID)?.map(|v| v.value()).unwrap_or(0);
        let id = last + 1;
        sequence.insert(LAST_ID, id)?;

        let t = now();
        let record = Record {
            id,
            kind,
            parent: parent.to_owned(),
            created: t,
            updated: t,
            labels,
            size: 0,
            inodes: 0,
        };
        put(&mut snapshots, key, &record)?;
        if let Some(&pid) = chain.first() {
            self.txn.open_table(CHILDREN)?.insert((pid, id), key)?;
        }
        Ok(Snapshot {
            id,
            kind,
            parent_ids: chain,
        })
    }

    /// Renames the active snapshot `key` to the committed `name`, keeping its id and parent,
    /// replacing its labels and recording its usage, which `measure` finds from the id once the
    /// checks have passed. Returns the id.
    pub fn commit_active(
        &self,
        key: &str,
        name: &str,
        labels: Labels,
        measure: impl FnOnce(u64) -> Result<Usage, Error>,
    ) -> Result<u64, Error> {
        let mut snapshots = self.txn.open_table(SNAPSHOTS)?;
        if snapshots.get(name)?.is_some() {
            return Err(Error::AlreadyExists(name.to_owned()));
        }
        let mut record = must_get(&snapshots, key)?;
        if record.kind != Kind::Active {
            return Err(Error::WrongKind {
                key: key.to_owned(),
                kind: record.kind,
                wanted: "not active",
            });
        }
        let usage = measure(record.id)?;
        let t = now();
        record.kind = Kind::Committed;
        record.created = t;
        record.updated = t;
        record.labels = labels;
        record.size = usage.size;
        record.inodes = usage.inodes;
        put(&mut snapshots, name, &record)?;
        snapshots.remove(key)?;
        if !record.parent.is_empty() {
            let parent = get(&snapshots, &record.parent)?
                .ok_or_else(|| Error::ParentNotFound(record.parent.clone()))?;
            self.txn
                .open_table(CHILDREN)?
                .insert((parent.id, record.id), name)?;
        }
        Ok(record.id)
    }

    /// Deletes `key` unless it has children. Returns its id.
    pub fn remove(&self, key: &str) -> Result<u64, Error> {
        let mut snapshots = self.txn.open_table(SNAPSHOTS)?;
        let mut children = self.txn.open_table(CHILDREN)?;
        let record = must_get(&snapshots, key)?;
        if children
            .range((record.id, 0)..=(record.id, u64::MAX))?
            .next()
            .is_some()
        {
            return Err(Error::HasChildren(key.to_owned()));
        }
        if !record.parent.is_empty()
            && let Some(parent) = get(&snapshots, &record.parent)?
        {
            children.remove((parent.id, record.id))?;
        }
        snapshots.remove(key)?;
        Ok(record.id)
    }

    /// Changes labels following containerd's field-mask rules (see `Snapshotter::update`).
    pub fn update(&self, name: &str, labels: Labels, paths: &[String]) -> Result<Info, Error> {
        let mut snapshots = self.txn.open_table(SNAPSHOTS)?;
        let mut record = must_get(&snapshots, name)?;
        let update = LabelUpdate::parse(paths).map_err(|path| {
            Error::InvalidArgument(format!("cannot update {path:?} field on snapshot {name:?}"))
        })?;
        record.labels = validate_labels(update.apply(record.labels, &labels))?;
        record.updated = now().max(record.created);
        put(&mut snapshots, name, &record)?;
        Ok(record.info(name))
    }
}

fn put(
    t: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    record: &Record,
) -> Result<(), Error> {
    let bytes = serde_json::to_vec(record).map_err(|e| Error::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    t.insert(key, bytes.as_slice())?;
    Ok(())
}
