//! Image references as `shoal convert` takes them: a registry image, named as containerd and
//! docker name it ([`crate::reference::Reference`]: `busybox` is
//! `docker.io/library/busybox:latest`; a `docker://` prefix is allowed), or an OCI image layout
//! directory, named as skopeo names it (`oci:<dir>[:<tag>]`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::Error;
use crate::reference::Reference;

const DEFAULT_TAG: &str = "latest";

/// An image, in a registry or in an OCI layout on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    Registry(Reference),
    Layout {
        dir: PathBuf,
        /// The `org.opencontainers.image.ref.name` of the image in `index.json`; for a source
        /// without one, the layout's only image.
        tag: Option<String>,
    },
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry(reference) => write!(f, "{reference}"),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
        }
    }
}

impl FromStr for ImageRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::Reference {
            value: s.chars().take(256).collect(),
            reason: reason.to_owned(),
        };
        let Some(rest) = s.strip_prefix("oci:") else {
            let name = s.strip_prefix("docker://").unwrap_or(s);
            return name
                .parse::<Reference>()
                .map(ImageRef::Registry)
                .map_err(|e| invalid(e.reason));
        };
        // Like skopeo: the path ends at the first ':', so it cannot hold one.
        let (dir, tag) = match rest.split_once(':') {
            Some((dir, tag)) => (dir, Some(tag)),
            None => (rest, None),
        };
        if dir.is_empty() {
            return Err(invalid("oci: needs a directory"));
        }
        if let Some(tag) = tag
            && !is_tag(tag)
        {
            return Err(invalid(
                "the tag after the layout directory must be 1-128 of [A-Za-z0-9_.-]",
            ));
        }
        Ok(ImageRef::Layout {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_owned),
        })
    }
}

fn is_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl ImageRef {
    /// The tag to write a destination under (`latest` when none was given); a digest cannot be
    /// a destination, since conversion makes a new manifest.
    pub(super) fn destination_tag(&self) -> Result<String, Error> {
        match self {
            ImageRef::Registry(Reference {
                digest: Some(_), ..
            }) => Err(Error::Reference {
                value: self.to_string(),
                reason:
                    "a destination needs a tag, not a digest: the converted image has a new one"
                        .into(),
            }),
            ImageRef::Registry(reference) => {
                Ok(reference.tag.clone().unwrap_or_else(|| DEFAULT_TAG.into()))
            }
            ImageRef::Layout { tag, .. } => Ok(tag.clone().unwrap_or_else(|| DEFAULT_TAG.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_refs_default_like_containerd() -> anyhow::Result<()> {
        for (input, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("docker://busybox:1.36", "docker.io/library/busybox:1.36"),
            ("127.0.0.1:5000/demo:v1", "127.0.0.1:5000/demo:v1"),
        ] {
            let parsed: ImageRef = input.parse()?;
            assert!(matches!(parsed, ImageRef::Registry(_)), "{input}");
            assert_eq!(parsed.to_string(), want);
        }
        Ok(())
    }

    #[test]
    fn layout_refs_split_at_the_first_colon() -> anyhow::Result<()> {
        assert_eq!(
            "oci:/tmp/x:v2".parse::<ImageRef>()?,
            ImageRef::Layout {
                dir: "/tmp/x".into(),
                tag: Some("v2".into())
            }
        );
        let untagged = "oci:rel/dir".parse::<ImageRef>()?;
        assert_eq!(untagged.destination_tag()?, "latest");
        assert_eq!(untagged.to_string(), "oci:rel/dir");
        Ok(())
    }

    #[test]
    fn bad_refs_are_refused_with_the_reason() {
        for bad in [
            "",
            "UPPER/case",
            "127.0.0.1:5000/demo:bad tag",
            "demo@sha256:short",
            "oci:",
            "oci:/x:a:b",
        ] {
            let err = bad.parse::<ImageRef>();
            assert!(
                matches!(err, Err(Error::Reference { .. })),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn a_digest_is_no_destination() -> anyhow::Result<()> {
        let pinned = format!("127.0.0.1:5000/d@sha256:{}", "a".repeat(64));
        let r: ImageRef = pinned.parse()?;
        assert!(r.destination_tag().is_err());
        assert_eq!(r.to_string(), pinned);
        let r: ImageRef = "127.0.0.1:5000/d:v1".parse()?;
        assert_eq!(r.destination_tag()?, "v1");
        Ok(())
    }
}
