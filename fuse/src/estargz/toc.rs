//! The TOC JSON (`stargz.index.json`): its model, a decoder that stops at [`Limits`], and the
//! RFC 3339 times its `modtime` fields hold.
//!
//! Field names and meanings follow stargz-snapshotter's `estargz.TOCEntry`. Numbers are kept
//! signed, as Go writes them, so that a negative value is refused by the index builder with the
//! entry's name rather than by serde with a byte position. Unknown fields are ignored.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{Error, Limits};

/// The whole TOC.
#[derive(Debug, Default, Serialize)]
pub(super) struct Toc {
    pub version: i64,
    pub entries: Vec<TocEntry>,
}

/// One TOC entry: a tar entry, or (`type: "chunk"`) a further chunk of the previous file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(rename = "modtime", skip_serializing_if = "String::is_empty")]
    pub mod_time: String,
    #[serde(rename = "linkName", skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub mode: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub uid: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub gid: i64,
    #[serde(rename = "userName", skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(rename = "groupName", skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: i64,
    #[serde(rename = "innerOffset", skip_serializing_if = "is_zero")]
    pub inner_offset: i64,
    #[serde(rename = "devMajor", skip_serializing_if = "is_zero")]
    pub dev_major: i64,
    #[serde(rename = "devMinor", skip_serializing_if = "is_zero")]
    pub dev_minor: i64,
    /// Name → base64 of the value (Go's encoding of `[]byte`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// `sha256:<hex>` of a regular file's whole content.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(rename = "chunkOffset", skip_serializing_if = "is_zero")]
    pub chunk_offset: i64,
    /// 0 means "to the end of the file".
    #[serde(rename = "chunkSize", skip_serializing_if = "is_zero")]
    pub chunk_size: i64,
    /// `sha256:<hex>` of this chunk's uncompressed bytes.
    #[serde(rename = "chunkDigest", skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Decodes TOC JSON, refusing more than `limits.max_entries` entries as soon as the next one
/// starts, so a TOC of millions of tiny entries never becomes millions of allocations.
pub(super) fn decode(json: &[u8], limits: &Limits) -> Result<Toc, Error> {
    let too_many = Cell::new(false);
    let seed = TocSeed {
        max_entries: limits.max_entries,
        too_many: &too_many,
    };
    let mut de = serde_json::Deserializer::from_slice(json);
    let result = seed
        .deserialize(&mut de)
        .and_then(|toc| de.end().map(|()| toc));
    match result {
        Ok(toc) => Ok(toc),
        Err(_) if too_many.get() => Err(Error::TooManyEntries {
            limit: limits.max_entries,
        }),
        Err(e) => Err(Error::TocJson(e)),
    }
}

struct TocSeed<'a> {
    max_entries: usize,
    too_many: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for TocSeed<'_> {
    type Value = Toc;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Toc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TocSeed<'_> {
    type Value = Toc;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOC object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Toc, A::Error> {
        let mut toc = Toc::default();
        let mut version = None;
        let mut entries = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "version" if version.is_none() => version = Some(map.next_value::<i64>()?),
                "entries" if entries.is_none() => {
                    entries = Some(map.next_value_seed(EntriesSeed {
                        max_entries: self.max_entries,
                        too_many: self.too_many,
                    })?);
                }
                "version" | "entries" => return Err(de::Error::custom(format!("duplicate {key}"))),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        toc.version = version.ok_or_else(|| de::Error::missing_field("version"))?;
        toc.entries = entries.unwrap_or_default();
        Ok(toc)
    }
}

struct EntriesSeed<'a> {
    max_entries: usize,
    too_many: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<TocEntry>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<TocEntry>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of TOC entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // The size hint comes from the input: trust it only up to a modest bound.
        let hint = seq.size_hint().unwrap_or(0).min(self.max_entries).min(4096);
        let mut entries = Vec::with_capacity(hint);
        while let Some(entry) = seq.next_element::<TocEntry>()? {
            if entries.len() == self.max_entries {
                self.too_many.set(true);
                return Err(de::Error::custom("too many entries"));
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// Formats `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (what Go's `time.RFC3339` gives for
/// a UTC time rounded to the second).
pub(super) fn format_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Parses an RFC 3339 date-time (`2006-01-02T15:04:05[.frac](Z|±hh:mm)`).
pub(super) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(r)?;
        digits.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    // 60 is a leap second; like Go, it is taken as the next second.
    if hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix(b".") {
        let len = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if len == 0 {
            return None;
        }
        for (i, &c) in frac[..len].iter().enumerate().take(9) {
            nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &frac[len..];
    }
    let offset = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (h, m) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let secs = h * 3600 + m * 60;
            if *sign == b'+' { secs } else { -secs }
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec - offset;
    let whole = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(whole)?
    } else {
        UNIX_EPOCH.checked_sub(whole)?
    };
    t.checked_add(Duration::from_nanos(u64::from(nanos)))
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_go_json_and_ignores_unknown_fields() -> anyhow::Result<()> {
        let json = br#"{"version":1,"future":{"x":[1,2]},"entries":[
            {"name":"bin/","type":"dir","modtime":"2021-06-01T10:00:00Z","mode":16877,"NumLink":0},
            {"name":"bin/sh","type":"reg","size":5,"offset":123,"digest":"sha256:00","chunkDigest":"sha256:11",
             "xattrs":{"user.a":"aGk="},"uid":1000,"userName":"me","innerOffset":0}
        ]}"#;
        let toc = decode(json, &Limits::default())?;
        assert_eq!(toc.version, 1);
        assert_eq!(toc.entries.len(), 2);
        let sh = &toc.entries[1];
        assert_eq!(
            (sh.kind.as_str(), sh.size, sh.offset, sh.uid),
            ("reg", 5, 123, 1000)
        );
        assert_eq!(sh.xattrs.get("user.a").map(String::as_str), Some("aGk="));
        Ok(())
    }

    #[test]
    fn stops_at_the_entry_limit() {
        let json = br#"{"version":1,"entries":[{},{},{}]}"#;
        let limits = Limits {
            max_entries: 2,
            ..Limits::default()
        };
        assert!(matches!(
            decode(json, &limits),
            Err(Error::TooManyEntries { limit: 2 })
        ));
        assert!(
            decode(
                json,
                &Limits {
                    max_entries: 3,
                    ..limits
                }
            )
            .is_ok()
        );
    }

    #[test]
    fn refuses_garbage() {
        for json in [
            &b""[..],
            b"[]",
            b"{",
            b"{\"entries\":[]}",
            b"{\"version\":1} x",
            b"\xff",
        ] {
            assert!(
                matches!(decode(json, &Limits::default()), Err(Error::TocJson(_))),
                "{json:?}"
            );
        }
    }

    #[test]
    fn rfc3339_round_trips() {
        for secs in [0i64, 1, 951_782_400, 1_622_541_600, 4_102_444_800, -86_401] {
            let text = format_rfc3339(secs);
            let parsed = parse_rfc3339(&text);
            let expected = if secs >= 0 {
                UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
            } else {
                UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
            };
            assert_eq!(parsed, expected, "{text}");
        }
        assert_eq!(format_rfc3339(1_622_541_600), "2021-06-01T10:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn rfc3339_offsets_fractions_and_garbage() {
        let at = |s| parse_rfc3339(s).and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        assert_eq!(
            at("2021-06-01T12:00:00+02:00"),
            Some(Duration::from_secs(1_622_541_600))
        );
        assert_eq!(
            at("2021-06-01T10:00:00.5Z"),
            Some(Duration::from_millis(1_622_541_600_500))
        );
        for bad in [
            "",
            "2021-06-01",
            "2021-13-01T00:00:00Z",
            "2021-02-29T00:00:00Z",
            "2021-06-01T10:00:00",
            "2021-06-01T10:00:00.Z",
            "2021-06-01T24:00:00Z",
            "2021-06-01T10:00:00+2:00",
            "2021-06-0aT10:00:00Z",
            "2021-06-01T10:00:00Zjunk",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
