//! Image references as containerd and the CRI spell them: `busybox`,
//! `docker.io/library/busybox:latest`, `127.0.0.1:5000/demo@sha256:…`.
//!
//! Normalized the way docker and containerd do it: no registry means `docker.io`, a single-name
//! repository on Docker Hub gets `library/`, and no tag and no digest means `latest`.

use std::fmt;
use std::str::FromStr;

use shoal_p2p::upstream::BlobSource;

/// A parsed, normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `127.0.0.1:5000`, ...
    pub registry: String,
    /// `library/busybox`, `demo/app`, ...
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>` when pinned.
    pub digest: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: &'static str,
}

impl Reference {
    /// Where the registry client fetches this image's manifests and blobs.
    pub fn source(&self) -> BlobSource {
        BlobSource::new(self.registry.clone(), self.repository.clone())
    }

    /// The digest if pinned, else the tag: what goes after `/manifests/`.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `registry/repository` without tag or digest, as containerd's image names start.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(reference: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ReferenceError {
            reference: reference.chars().take(256).collect(),
            reason,
        };
        if reference.is_empty() || reference.len() > 4096 {
            return Err(fail("empty or longer than 4096 bytes"));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) => {
                let hex = digest
                    .strip_prefix("sha256:")
                    .ok_or_else(|| fail("digest is not sha256:<hex>"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(fail("digest is not sha256:<64 lowercase hex>"));
                }
                (rest, Some(digest.to_owned()))
            }
            None => (reference, None),
        };
        // A tag is after the last ':' that comes after the last '/' (a port is before it).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest, None),
        };
        if let Some(tag) = &tag
            && (tag.is_empty()
                || tag.len() > 128
                || !tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
        {
            return Err(fail("tag must be 1-128 of [A-Za-z0-9_.-]"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        let parsed = Reference {
            registry,
            repository,
            tag,
            digest,
        };
        parsed
            .source()
            .validate()
            .map_err(|_| fail("registry or repository name is not valid"))?;
        Ok(parsed)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_docker() -> anyhow::Result<()> {
        let r: Reference = "busybox".parse()?;
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        let r: Reference = "127.0.0.1:5000/demo/app".parse()?;
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "demo/app")
        );
        assert_eq!(r.object(), "latest");
        let pinned = format!("localhost/app:v1@sha256:{}", "a".repeat(64));
        let r: Reference = pinned.parse()?;
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.object(), format!("sha256:{}", "a".repeat(64)));
        assert_eq!(r.to_string(), pinned);
        Ok(())
    }

    #[test]
    fn refuses_what_no_registry_accepts() {
        for bad in ["", "a@sha256:zz", "a:", "A/B", "a/../b", "x:y:z/q"] {
            assert!(bad.parse::<Reference>().is_err(), "{bad:?}");
        }
    }
}
