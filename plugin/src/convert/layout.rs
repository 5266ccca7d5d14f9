//! OCI image layouts on disk (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), read as a
//! conversion source and written as a destination, as skopeo and umoci read and write them.
//!
//! Images in `index.json` are named by their `org.opencontainers.image.ref.name` annotation.
//! Blobs are written to a temporary file beside their final name and renamed into place, and
//! `index.json` likewise, so a reader never sees half a blob or half an index; every blob read
//! is checked against its digest. Everything here blocks: callers run it on a blocking thread.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, MediaType};
use shoal_p2p::Digest;
use shoal_p2p::digest::Hasher;

use super::{Error, MAX_JSON_BYTES};

pub(super) const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT_VERSION: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

/// One OCI layout directory.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// An existing layout; fails if `dir` has no `oci-layout` file.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let marker = dir.join(LAYOUT_FILE);
        if !marker.is_file() {
            return Err(Error::Layout {
                dir: dir.to_owned(),
                reason: format!("no {LAYOUT_FILE} file: not an OCI image layout"),
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// A layout to write into: created (with the directory) if missing, else opened.
    pub fn create(dir: &Path) -> Result<Self, Error> {
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(|e| io_error(&blobs, "creating", e))?;
        let marker = dir.join(LAYOUT_FILE);
        if !marker.exists() {
            fs::write(&marker, LAYOUT_VERSION).map_err(|e| io_error(&marker, "writing", e))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The descriptor `index.json` names `tag`, or with no tag its only image.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, Error> {
        let index = self.index()?;
        let named = |d: &&Descriptor| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME_ANNOTATION))
                .map(String::as_str)
                == tag
        };
        let found = match (tag, index.manifests().as_slice()) {
            (None, [only]) => Some(only),
            (None, all) => {
                return Err(self.bad(format!(
                    "holds {} images; name one as oci:DIR:TAG",
                    all.len()
                )));
            }
            (Some(_), all) => all.iter().find(named),
        };
        found
            .cloned()
            .ok_or_else(|| self.bad(format!("no image named {tag:?} in index.json")))
    }

    /// A small blob (manifest, config), read whole and checked.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|e| io_error(&path, "opening", e))?;
        let mut data = Vec::new();
        file.take(MAX_JSON_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| io_error(&path, "reading", e))?;
        if data.len() as u64 > MAX_JSON_BYTES {
            return Err(Error::TooLarge {
                what: format!("blob {digest} in {}", self.dir.display()),
            });
        }
        if Digest::of(&data) != *digest {
            return Err(self.bad(format!("blob {digest} does not hash to its name")));
        }
        Ok(data)
    }

    /// Copies a blob to `dest`, checking its digest on the way; returns its size.
    pub fn copy_blob_to(
        &self,
        digest: &Digest,
        dest: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<u64, Error> {
        let path = self.blob_path(digest);
        let mut from = File::open(&path).map_err(|e| io_error(&path, "opening", e))?;
        let mut to = File::create(dest).map_err(|e| io_error(dest, "creating", e))?;
        let got = copy_hashing(&mut from, &mut to, progress)
            .map_err(|e| io_error(&path, "copying", e))?;
        if got.0 != *digest {
            return Err(self.bad(format!("blob {digest} hashes to {}", got.0)));
        }
        Ok(got.1)
    }

    /// Stores the file at `src` as blob `digest` (checked while copying).
    pub fn put_blob_file(
        &self,
        digest: &Digest,
        src: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<(), Error> {
        let final_path = self.blob_path(digest);
        let tmp = temp_beside(&final_path);
        let result = (|| {
            let mut from = File::open(src).map_err(|e| io_error(src, "opening", e))?;
            let mut to = File::create(&tmp).map_err(|e| io_error(&tmp, "creating", e))?;
            let (got, _) = copy_hashing(&mut from, &mut to, progress)
                .map_err(|e| io_error(&tmp, "writing", e))?;
            if got != *digest {
                return Err(Error::Layout {
                    dir: self.dir.clone(),
                    reason: format!("{} hashes to {got}, not {digest}", src.display()),
                });
            }
            to.sync_all().map_err(|e| io_error(&tmp, "syncing", e))?;
            fs::rename(&tmp, &final_path).map_err(|e| io_error(&final_path, "renaming", e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Stores `data` as a blob; returns its digest.
    pub fn put_blob_bytes(&self, data: &[u8]) -> Result<Digest, Error> {
        let digest = Digest::of(data);
        let path = self.blob_path(&digest);
        write_atomically(&path, data)?;
        Ok(digest)
    }

    /// Points `tag` at `descriptor` in `index.json`, replacing what the tag named before and
    /// keeping every other image.
    pub fn tag(&self, mut descriptor: Descriptor, tag: &str) -> Result<(), Error> {
        let mut index = if self.dir.join("index.json").exists() {
            self.index()?
        } else {
            ImageIndexBuilder::default()
                .schema_version(2u32)
                .media_type(MediaType::ImageIndex)
                .manifests(Vec::new())
                .build()
                .map_err(|e| self.bad(format!("building index.json: {e}")))?
        };
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME_ANNOTATION))
                    .is_none_or(|name| name != tag)
            })
            .cloned()
            .collect();
        let mut annotations = descriptor.annotations().clone().unwrap_or_default();
        annotations.insert(REF_NAME_ANNOTATION.to_owned(), tag.to_owned());
        descriptor.set_annotations(Some(annotations));
        manifests.push(descriptor);
        index.set_manifests(manifests);
        let json = serde_json::to_vec(&index).map_err(|e| Error::Json {
            what: format!("{}/index.json", self.dir.display()),
            source: e,
        })?;
        write_atomically(&self.dir.join("index.json"), &json)
    }

    fn index(&self) -> Result<ImageIndex, Error> {
        let path = self.dir.join("index.json");
        let file = File::open(&path).map_err(|e| io_error(&path, "opening", e))?;
        let mut data = Vec::new();
        file.take(MAX_JSON_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| io_error(&path, "reading", e))?;
        if data.len() as u64 > MAX_JSON_BYTES {
            return Err(Error::TooLarge {
                what: path.display().to_string(),
            });
        }
        serde_json::from_slice(&data).map_err(|e| Error::Json {
            what: path.display().to_string(),
            source: e,
        })
    }

    fn bad(&self, reason: String) -> Error {
        Error::Layout {
            dir: self.dir.clone(),
            reason,
        }
    }
}

fn io_error(path: &Path, doing: &'static str, source: io::Error) -> Error {
    Error::Io {
        doing,
        path: path.to_owned(),
        source,
    }
}

/// `path` with a unique suffix, in the same directory so that a rename is atomic.
fn temp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), Error> {
    let tmp = temp_beside(path);
    let result = (|| {
        let mut file = File::create(&tmp).map_err(|e| io_error(&tmp, "creating", e))?;
        file.write_all(data)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error(&tmp, "writing", e))?;
        fs::rename(&tmp, path).map_err(|e| io_error(path, "renaming", e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies `from` to `to`, returning the digest and length of what passed.
fn copy_hashing(
    from: &mut impl Read,
    to: &mut impl Write,
    progress: &dyn Fn(u64),
) -> io::Result<(Digest, u64)> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        total += n as u64;
        progress(total);
    }
    to.flush()?;
    Ok((hasher.finish(), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(data: &[u8]) -> anyhow::Result<Descriptor> {
        let digest: oci_spec::image::Digest = Digest::of(data).to_string().parse()?;
        Ok(Descriptor::new(
            MediaType::ImageManifest,
            data.len() as u64,
            digest,
        ))
    }

    #[test]
    fn writes_blobs_and_tags_that_read_back() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("layout");
        let layout = Layout::create(&dir)?;
        assert!(Layout::open(&dir).is_ok());
        assert!(Layout::open(tmp.path()).is_err(), "no oci-layout file");

        let (one, two) = (br#"{"a":1}"#.as_slice(), br#"{"b":2}"#.as_slice());
        let d1 = layout.put_blob_bytes(one)?;
        let d2 = layout.put_blob_bytes(two)?;
        assert!(layout.has_blob(&d1));
        assert_eq!(layout.read_blob(&d1)?, one);

        layout.tag(descriptor(one)?, "v1")?;
        // The only image needs no name.
        assert_eq!(layout.resolve(None)?.digest().to_string(), d1.to_string());
        layout.tag(descriptor(two)?, "v2")?;
        assert!(layout.resolve(None).is_err(), "two images, none named");
        // Re-tagging replaces the old entry and keeps the others.
        layout.tag(descriptor(two)?, "v1")?;
        let index = layout.index()?;
        assert_eq!(index.manifests().len(), 2);
        for tag in ["v1", "v2"] {
            let found = layout.resolve(Some(tag))?;
            assert_eq!(found.digest().to_string(), d2.to_string(), "{tag}");
        }
        assert!(layout.resolve(Some("v3")).is_err());

        // A file copied in is checked, and copied back out whole.
        let src = tmp.path().join("big");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        fs::write(&src, &data)?;
        let digest = Digest::of(&data);
        layout.put_blob_file(&digest, &src, &|_| {})?;
        let out = tmp.path().join("out");
        assert_eq!(
            layout.copy_blob_to(&digest, &out, &|_| {})?,
            data.len() as u64
        );
        assert_eq!(fs::read(&out)?, data);
        assert!(layout.put_blob_file(&d1, &src, &|_| {}).is_err());
        let leftovers = fs::read_dir(dir.join("blobs/sha256"))?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .count();
        assert_eq!(leftovers, 0);
        Ok(())
    }

    #[test]
    fn tampered_blobs_are_refused() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let layout = Layout::create(tmp.path())?;
        let digest = layout.put_blob_bytes(b"{}")?;
        fs::write(layout.blob_path(&digest), b"{ }")?;
        assert!(matches!(
            layout.read_blob(&digest),
            Err(Error::Layout { .. })
        ));
        let out = tmp.path().join("out");
        assert!(layout.copy_blob_to(&digest, &out, &|_| {}).is_err());
        Ok(())
    }
}
