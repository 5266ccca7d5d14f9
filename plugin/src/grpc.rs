//! What the two tonic adapters (`snapshotter/service.rs`, `content/service.rs`) share. Each
//! service keeps its own error enum and its own table of gRPC codes (`Error::code`); this is
//! how such an error becomes the `Status` containerd reads, and how `List` answers are cut
//! into messages.

use tonic::{Code, Status};

/// `List` answers in messages of this many items, as containerd's own services do.
const LIST_BATCH: usize = 100;

/// A `Status` with `code` and the whole chain of `error`, so that an internal error says what
/// failed underneath.
pub(crate) fn status(code: Code, error: &dyn std::error::Error) -> Status {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Status::new(code, message)
}

/// `items` in `List` responses of at most [`LIST_BATCH`] each, made by `response`; none at all
/// when there are no items.
pub(crate) fn list_batches<T, R>(
    items: impl IntoIterator<Item = T>,
    response: impl Fn(Vec<T>) -> R,
) -> Vec<Result<R, Status>> {
    let mut items = items.into_iter().peekable();
    let mut batches = Vec::new();
    while items.peek().is_some() {
        batches.push(Ok(response(items.by_ref().take(LIST_BATCH).collect())));
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn status_carries_the_chain() {
        let s = status(Code::Internal, &Outer(std::io::Error::other("inner")));
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "outer: inner");
    }

    #[test]
    fn lists_come_in_batches_of_100() -> anyhow::Result<()> {
        let sizes = |n: usize| -> Result<Vec<usize>, Status> {
            list_batches(0..n, |b| b.len()).into_iter().collect()
        };
        assert_eq!(sizes(0)?, Vec::<usize>::new());
        assert_eq!(sizes(100)?, vec![100]);
        assert_eq!(sizes(250)?, vec![100, 100, 50]);
        Ok(())
    }
}
