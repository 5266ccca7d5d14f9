//! What the two redb metadata stores (`snapshotter/meta.rs`, `content/meta.rs`) share: times
//! are stored as nanoseconds since the Unix epoch, and every redb error becomes the `Db`
//! variant of the service's own error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, as stored.
pub(crate) fn now() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// A stored time as a `SystemTime`.
pub(crate) fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// `impl From<E> for $error` for every redb error type `E`, into `$error::Db(Box<redb::Error>)`,
/// so redb calls can use `?`.
macro_rules! db_errors {
    ($error:ty) => {
        $crate::meta::db_errors!(@each $error;
            redb::Error,
            redb::DatabaseError,
            redb::TransactionError,
            redb::TableError,
            redb::StorageError,
            redb::CommitError
        );
    };
    (@each $error:ty; $($t:ty),*) => {$(
        impl From<$t> for $error {
            fn from(e: $t) -> Self {
                Self::Db(Box::new(e.into()))
            }
        }
    )*};
}
pub(crate) use db_errors;
