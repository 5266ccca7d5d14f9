//! Labels, and the other strings containerd sends that become database keys, checked the same
//! way by the snapshotter and the content store: containerd's own limits (`pkg/labels`), a cap
//! on how many labels one record may carry, and containerd's field-mask rules for `Update`.
//!
//! The checks answer with a reason; each service wraps it in its own InvalidArgument error.

use std::collections::HashMap;

/// Labels of a snapshot or blob, as containerd sends them. An empty value means "no such
/// label".
pub type Labels = HashMap<String, String>;

/// containerd allows at most this many bytes in one label's key and value together
/// (`pkg/labels/validate.go`).
pub const MAX_LABEL_SIZE: usize = 4096;
/// Labels one snapshot or blob may carry. containerd sets a handful; the cap keeps one request
/// from growing a metadata record without bound.
pub const MAX_LABELS: usize = 256;

/// Checks labels as containerd does, plus a cap on their number, and drops empty values (an
/// empty value removes a label in containerd's stores).
pub(crate) fn validate(mut labels: Labels) -> Result<Labels, String> {
    labels.retain(|_, v| !v.is_empty());
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels, at most {MAX_LABELS} allowed",
            labels.len()
        ));
    }
    for (k, v) in &labels {
        if k.len() + v.len() > MAX_LABEL_SIZE {
            // containerd's message, which shows at most 64 characters of the key.
            let shown: String = k.chars().take(64).collect();
            return Err(format!(
                "label key and value length ({} bytes) greater than maximum size \
                 ({MAX_LABEL_SIZE} bytes), key: {shown}",
                k.len() + v.len()
            ));
        }
    }
    Ok(labels)
}

/// Checks a snapshot key or name, or an ingest ref, called `what` in the reason. They never
/// become paths (ids and hashes name the directories), so only emptiness, size and NUL matter.
pub(crate) fn validate_name(what: &str, name: &str, max: usize) -> Result<(), String> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > max {
        "is too long"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(format!("{what} {reason}"))
}

/// What an `Update` request's field mask asks for, following containerd's stores: no paths or
/// `labels` replace all labels, `labels.<key>` sets or removes only that one.
#[derive(Debug)]
pub(crate) struct LabelUpdate {
    replace: bool,
    keys: Vec<String>,
}

impl LabelUpdate {
    /// Reads the mask; a path that is not about labels is returned as the error.
    pub fn parse(paths: &[String]) -> Result<Self, &str> {
        let mut update = LabelUpdate {
            replace: paths.is_empty(),
            keys: Vec::new(),
        };
        for path in paths {
            match path.strip_prefix("labels.") {
                _ if path == "labels" => update.replace = true,
                Some(key) => update.keys.push(key.to_owned()),
                None => return Err(path),
            }
        }
        Ok(update)
    }

    /// The labels after the update of `current` with the request's `labels`, not yet
    /// [validated](validate). Applying the paths in order, as containerd does, comes to the
    /// same: once `labels` is among them, every `labels.<key>` copies from the same map.
    pub fn apply(self, current: Labels, labels: &Labels) -> Labels {
        let mut new = if self.replace {
            labels.clone()
        } else {
            current
        };
        for key in self.keys {
            match labels.get(&key) {
                Some(value) => new.insert(key, value.clone()),
                None => new.remove(&key),
            };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn labels_are_checked_like_containerd() {
        let ok = Labels::from([("a".to_owned(), "x".repeat(4095))]);
        assert!(validate(ok).is_ok());
        let big = Labels::from([("ab".to_owned(), "x".repeat(4095))]);
        assert!(validate(big).is_err());
        let empty = Labels::from([("gone".to_owned(), String::new())]);
        assert!(validate(empty).is_ok_and(|l| l.is_empty()));
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (i.to_string(), "v".to_owned()))
            .collect();
        assert!(validate(many).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("key", "default/1/sha256:abc", 64).is_ok());
        assert!(
            validate_name("ref", "../../etc/passwd", 64).is_ok(),
            "names are never paths"
        );
        assert_eq!(
            validate_name("ref", "", 64).err().as_deref(),
            Some("ref must not be empty")
        );
        assert!(validate_name("key", "a\0b", 64).is_err());
        assert!(validate_name("key", &"k".repeat(64), 64).is_ok());
        assert!(validate_name("key", &"k".repeat(65), 64).is_err());
    }

    #[test]
    fn updates_follow_field_masks() {
        let current = labels(&[("a", "1"), ("b", "2")]);
        let request = labels(&[("a", "9"), ("c", "3")]);
        let update = |paths: &[&str]| {
            let paths: Vec<String> = paths.iter().map(|p| (*p).to_owned()).collect();
            LabelUpdate::parse(&paths)
                .map(|u| u.apply(current.clone(), &request))
                .map_err(str::to_owned)
        };
        assert_eq!(update(&[]), Ok(request.clone()));
        assert_eq!(update(&["labels"]), Ok(request.clone()));
        assert_eq!(update(&["labels.b", "labels"]), Ok(request.clone()));
        assert_eq!(update(&["labels.a", "labels.b"]), Ok(labels(&[("a", "9")])));
        assert_eq!(
            update(&["labels.c"]),
            Ok(labels(&[("a", "1"), ("b", "2"), ("c", "3")]))
        );
        assert_eq!(update(&["labels.a", "size"]), Err("size".to_owned()));
    }
}
