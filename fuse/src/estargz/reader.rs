//! [`Layer`]: an eStargz blob opened through a [`ChunkSource`]: its footer and TOC read and
//! checked once, then any chunk read, inflated and verified on demand.
//!
//! Opening costs two reads at the end of the blob (footer, then the TOC member), however large
//! the layer is. Every allocation is bounded by [`Limits`] before it is made; a chunk's bytes
//! are returned only once their sha256 matches the TOC's `chunkDigest`.

use std::cell::Cell;
use std::io::{self, BufReader, Read};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::{
    Error, FOOTER_SIZE, Limits, MAX_CHUNK_SIZE, TOC_TAR_NAME, build, footer, parse_sha256,
    sha256_digest,
};
use crate::index::{Chunk, Index};
use crate::source::ChunkSource;

/// How much of the blob one `read_at` call asks for while inflating.
const READ_SIZE: u64 = 1 << 20;

/// An opened eStargz layer: its checked [`Index`] and where its bytes come from.
#[derive(Debug)]
pub struct Layer {
    index: Index,
    source: Arc<dyn ChunkSource>,
    toc_digest: String,
}

impl Layer {
    /// Reads footer and TOC through `source`, checks the TOC's sha256 against `toc_digest`
    /// (`sha256:<hex>`, from the manifest's [`TOC_DIGEST_ANNOTATION`]) when given, and parses
    /// and validates it into an [`Index`].
    ///
    /// [`TOC_DIGEST_ANNOTATION`]: super::TOC_DIGEST_ANNOTATION
    pub fn open(
        source: Arc<dyn ChunkSource>,
        toc_digest: Option<&str>,
        limits: &Limits,
    ) -> Result<Layer, Error> {
        let expected = match toc_digest {
            Some(d) => Some(parse_sha256(d).ok_or_else(|| Error::BadDigest(d.to_owned()))?),
            None => None,
        };
        let size = source.size();
        let tail_len = size.min(FOOTER_SIZE);
        let mut tail = vec![0u8; tail_len as usize];
        source
            .read_at(size - tail_len, &mut tail)
            .map_err(Error::Io)?;
        let footer = footer::decode(&tail)?;

        let toc_end = size - footer.size;
        if footer.toc_offset >= toc_end {
            return Err(Error::TocOffsetBeyondBlob {
                offset: footer.toc_offset,
                size: toc_end,
            });
        }
        let compressed_len = toc_end - footer.toc_offset;
        if compressed_len > limits.max_toc_compressed {
            let limit = limits.max_toc_compressed;
            return Err(Error::TocTooLarge {
                size: compressed_len,
                limit,
            });
        }
        let mut compressed = vec![0u8; compressed_len as usize];
        source
            .read_at(footer.toc_offset, &mut compressed)
            .map_err(Error::Io)?;
        let json = inflate_toc(&compressed, limits)?;

        let actual = sha256_digest(&json);
        if let Some(expected) = expected
            && Sha256::digest(&json).as_slice() != expected
        {
            let expected = format!("sha256:{}", hex::encode(expected));
            return Err(Error::TocDigestMismatch { expected, actual });
        }
        let index = build::parse_toc(&json, footer.toc_offset, limits)?;
        Ok(Layer {
            index,
            source,
            toc_digest: actual,
        })
    }

    /// The layer's checked file tree.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Where the layer's compressed bytes come from.
    pub fn source(&self) -> &Arc<dyn ChunkSource> {
        &self.source
    }

    /// `sha256:<hex>` of the TOC JSON actually read.
    pub fn toc_digest(&self) -> &str {
        &self.toc_digest
    }

    /// Fetches `chunk.compressed` through the source, inflates it (producing no more than
    /// `inner_offset + size` bytes), skips `inner_offset`, and checks the sha256 against
    /// `chunk.digest`. Wrong bytes are an error, never returned.
    pub fn read_chunk(&self, chunk: &Chunk) -> Result<Vec<u8>, Error> {
        let start = chunk.compressed.start;
        let size = self.source.size();
        if chunk.compressed.end > size || start >= chunk.compressed.end {
            return Err(Error::ChunkRange {
                start,
                end: chunk.compressed.end,
                size,
            });
        }
        let source_error = Cell::new(None);
        let range = RangeReader {
            source: &*self.source,
            pos: start,
            end: chunk.compressed.end,
            error: &source_error,
        };
        let buffered =
            BufReader::with_capacity(READ_SIZE.min(chunk.compressed.end - start) as usize, range);
        let mut inflater = flate2::bufread::MultiGzDecoder::new(buffered);
        let fail = |e: io::Error| match source_error.take() {
            Some(source) => Error::Io(source),
            None => Error::Inflate {
                offset: start,
                source: e,
            },
        };

        let skipped = io::copy(
            &mut (&mut inflater).take(chunk.inner_offset),
            &mut io::sink(),
        )
        .map_err(fail)?;
        let wanted = chunk.size;
        let truncated = |got| Error::ChunkTruncated {
            offset: start,
            wanted,
            got,
        };
        if skipped < chunk.inner_offset {
            return Err(truncated(0));
        }
        // `size` comes from a checked Index, but a Chunk can be made by anyone: never
        // preallocate more than a real chunk can hold.
        let mut out = Vec::with_capacity(wanted.min(MAX_CHUNK_SIZE) as usize);
        (&mut inflater)
            .take(wanted)
            .read_to_end(&mut out)
            .map_err(fail)?;
        if (out.len() as u64) < wanted {
            return Err(truncated(out.len() as u64));
        }
        let actual = Sha256::digest(&out);
        if actual.as_slice() != chunk.digest {
            return Err(Error::ChunkDigest {
                offset: start,
                expected: hex::encode(chunk.digest),
                actual: hex::encode(actual),
            });
        }
        Ok(out)
    }
}

/// Inflates the TOC member and returns the `stargz.index.json` entry's bytes, refusing an
/// entry larger than `limits.max_toc_json` from its tar header, before reading it.
fn inflate_toc(compressed: &[u8], limits: &Limits) -> Result<Vec<u8>, Error> {
    // One member only: the footer follows, and nothing after the TOC entry matters.
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(compressed));
    let mut entries = archive.entries().map_err(Error::TocArchive)?;
    let mut entry = match entries.next() {
        Some(entry) => entry.map_err(Error::TocArchive)?,
        None => return Err(Error::TocName(String::new())),
    };
    let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    if name != TOC_TAR_NAME {
        return Err(Error::TocName(name));
    }
    let size = entry.size();
    if size > limits.max_toc_json {
        return Err(Error::TocJsonTooLarge {
            size,
            limit: limits.max_toc_json,
        });
    }
    // Grow with what actually inflates, not with what the header claims.
    let mut json = Vec::with_capacity(size.min(1 << 20) as usize);
    (&mut entry)
        .take(size)
        .read_to_end(&mut json)
        .map_err(Error::TocArchive)?;
    if (json.len() as u64) < size {
        let e = io::Error::new(io::ErrorKind::UnexpectedEof, "TOC JSON cut short");
        return Err(Error::TocArchive(e));
    }
    Ok(json)
}

/// A blob range as a `Read`, in [`READ_SIZE`] requests. A source failure is kept aside so it
/// is reported as such, not as corrupt data.
struct RangeReader<'a> {
    source: &'a dyn ChunkSource,
    pos: u64,
    end: u64,
    error: &'a Cell<Option<io::Error>>,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.end - self.pos).min(buf.len() as u64).min(READ_SIZE) as usize;
        if n == 0 {
            return Ok(0);
        }
        if let Err(e) = self.source.read_at(self.pos, &mut buf[..n]) {
            let kind = e.kind();
            self.error.set(Some(e));
            return Err(io::Error::new(kind, "blob read failed"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}
