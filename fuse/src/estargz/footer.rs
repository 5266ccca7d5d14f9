//! The footer that ends every eStargz blob and says where the TOC member starts.
//!
//! Both footers are empty gzip members (a stored, final, zero-length deflate block) whose
//! header carries the TOC offset in its `FEXTRA` field, so the whole blob still inflates as one
//! multi-member gzip stream:
//!
//! ```text
//! eStargz (51 bytes): 1f 8b 08 04 00000000 00 ff | XLEN=26 | 'S' 'G' LEN=22 "%016x" "STARGZ" | 01 0000 ffff | crc=0 isize=0
//! legacy  (47 bytes): 1f 8b 08 04 00000000 00 ff | XLEN=22 |          "%016x" "STARGZ" | 01 0000 ffff | crc=0 isize=0
//! ```
//!
//! Like the reference reader, only the gzip header is checked; the empty body is not inflated.

use super::{Error, FOOTER_SIZE, LEGACY_FOOTER_SIZE};

/// Magic, `CM = deflate`, `FLG = FEXTRA`.
const GZIP_HEADER_START: [u8; 4] = [0x1f, 0x8b, 0x08, 0x04];
/// The rest of the member after the extra field: a final stored block of length 0, then the
/// gzip trailer (CRC32 and ISIZE of nothing).
const EMPTY_BODY: [u8; 13] = [1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
const MAGIC: &[u8; 6] = b"STARGZ";

/// The 51-byte eStargz footer pointing at a TOC member at `toc_offset`.
pub(super) fn encode(toc_offset: u64) -> [u8; FOOTER_SIZE as usize] {
    let mut out = [0u8; FOOTER_SIZE as usize];
    out[..4].copy_from_slice(&GZIP_HEADER_START);
    // MTIME = 0, XFL = 0, OS = 255 (unknown).
    out[9] = 0xff;
    out[10..12].copy_from_slice(&26u16.to_le_bytes());
    out[12..14].copy_from_slice(b"SG");
    out[14..16].copy_from_slice(&22u16.to_le_bytes());
    out[16..32].copy_from_slice(format!("{toc_offset:016x}").as_bytes());
    out[32..38].copy_from_slice(MAGIC);
    out[38..].copy_from_slice(&EMPTY_BODY);
    out
}

/// The footer found at the end of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Footer {
    pub toc_offset: u64,
    /// [`FOOTER_SIZE`] or [`LEGACY_FOOTER_SIZE`].
    pub size: u64,
}

/// Parses the footer from the blob's last bytes (`tail`, at most [`FOOTER_SIZE`] of them; fewer
/// only when the blob is that small). The eStargz footer is tried first, then the legacy one.
pub(super) fn decode(tail: &[u8]) -> Result<Footer, Error> {
    if (tail.len() as u64) < LEGACY_FOOTER_SIZE {
        return Err(Error::TruncatedFooter {
            size: tail.len() as u64,
        });
    }
    let estargz = match tail.len().checked_sub(FOOTER_SIZE as usize) {
        Some(start) => decode_estargz(&tail[start..]),
        None => Err(Error::BadFooter("blob too small for an eStargz footer")),
    };
    let estargz_err = match estargz {
        Ok(toc_offset) => {
            return Ok(Footer {
                toc_offset,
                size: FOOTER_SIZE,
            });
        }
        Err(e) => e,
    };
    let legacy = &tail[tail.len() - LEGACY_FOOTER_SIZE as usize..];
    match decode_legacy(legacy) {
        Ok(toc_offset) => Ok(Footer {
            toc_offset,
            size: LEGACY_FOOTER_SIZE,
        }),
        // A legacy footer has no subfield header, so a blob that is not legacy fails there with
        // a less telling message: report what is wrong with it as an eStargz footer.
        Err(_) => Err(estargz_err),
    }
}

fn decode_estargz(footer: &[u8]) -> Result<u64, Error> {
    let extra = gzip_extra(footer)?;
    if extra.len() != 26 {
        return Err(Error::BadFooter("extra field is not 26 bytes"));
    }
    if &extra[..2] != b"SG" {
        return Err(Error::BadFooter("extra subfield is not 'S' 'G'"));
    }
    if extra[2..4] != 22u16.to_le_bytes() {
        return Err(Error::BadFooter("'S' 'G' subfield is not 22 bytes"));
    }
    offset_and_magic(&extra[4..])
}

fn decode_legacy(footer: &[u8]) -> Result<u64, Error> {
    let extra = gzip_extra(footer)?;
    if extra.len() != 22 {
        return Err(Error::BadFooter("extra field is not 22 bytes"));
    }
    offset_and_magic(extra)
}

/// The `FEXTRA` payload of a footer that must consist of exactly header, extra and empty body.
fn gzip_extra(footer: &[u8]) -> Result<&[u8], Error> {
    if footer.len() < 12 || footer[..4] != GZIP_HEADER_START {
        return Err(Error::BadFooter("not a gzip header with only FEXTRA set"));
    }
    let xlen = usize::from(u16::from_le_bytes([footer[10], footer[11]]));
    if 12 + xlen + EMPTY_BODY.len() != footer.len() {
        return Err(Error::BadFooter(
            "extra field length does not match the footer size",
        ));
    }
    Ok(&footer[12..12 + xlen])
}

/// `%016x` + `STARGZ`.
fn offset_and_magic(field: &[u8]) -> Result<u64, Error> {
    let (hex, magic) = field.split_at(16);
    if magic != MAGIC {
        return Err(Error::BadFooter("no STARGZ magic"));
    }
    // `from_str_radix` would also take a leading '+'.
    if !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(Error::BadFooter("TOC offset is not 16 hex digits"));
    }
    let hex = std::str::from_utf8(hex).map_err(|_| Error::BadFooter("TOC offset is not hex"))?;
    u64::from_str_radix(hex, 16).map_err(|_| Error::BadFooter("TOC offset is not hex"))
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    /// The footer written by stargz-snapshotter's `gzipFooterBytes(0x1234)`, byte for byte.
    const REFERENCE: &str = "1f8b08040000000000ff1a00534716003030303030303030303030303132333453544152475a010000ffff0000000000000000";

    #[test]
    fn encodes_like_the_reference() -> anyhow::Result<()> {
        assert_eq!(hex::encode(encode(0x1234)), REFERENCE);
        // And it is an empty gzip member, so the blob inflates as one stream.
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&encode(99)[..]).read_to_end(&mut out)?;
        assert!(out.is_empty());
        Ok(())
    }

    #[test]
    fn round_trips_and_reads_legacy() -> anyhow::Result<()> {
        let footer = decode(&encode(u64::MAX))?;
        assert_eq!(
            footer,
            Footer {
                toc_offset: u64::MAX,
                size: FOOTER_SIZE
            }
        );

        // Legacy: XLEN = 22, no subfield header.
        let mut legacy = Vec::from(&GZIP_HEADER_START[..]);
        legacy.extend_from_slice(&[0, 0, 0, 0, 0, 0xff, 22, 0]);
        legacy.extend_from_slice(b"00000000000abcdeSTARGZ");
        legacy.extend_from_slice(&EMPTY_BODY);
        assert_eq!(legacy.len() as u64, LEGACY_FOOTER_SIZE);
        let footer = decode(&legacy)?;
        assert_eq!(
            footer,
            Footer {
                toc_offset: 0xabcde,
                size: LEGACY_FOOTER_SIZE
            }
        );
        // A legacy footer preceded by four bytes of the blob, as read from its last 51 bytes.
        let mut tail = vec![7u8; 4];
        tail.extend_from_slice(&legacy);
        assert_eq!(decode(&tail)?.toc_offset, 0xabcde);
        Ok(())
    }

    #[test]
    fn refuses_bad_footers() {
        assert!(matches!(
            decode(&[0u8; 46]),
            Err(Error::TruncatedFooter { size: 46 })
        ));
        let good = encode(5);
        let mut bad_magic = good;
        bad_magic[37] = b'X';
        let mut bad_hex = good;
        bad_hex[16] = b'+';
        let mut bad_id = good;
        bad_id[12] = b'E';
        let mut not_gzip = good;
        not_gzip[0] = 0;
        for (footer, want) in [
            (bad_magic, "no STARGZ magic"),
            (bad_hex, "not 16 hex digits"),
            (bad_id, "'S' 'G'"),
            (not_gzip, "not a gzip header"),
        ] {
            let err = decode(&footer)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
