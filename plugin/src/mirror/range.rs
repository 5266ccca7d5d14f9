//! The single-range subset of HTTP `Range` that registries clients send (`bytes=N-`,
//! `bytes=N-M`, `bytes=-N`).

use std::ops::Range;

use axum::http::HeaderValue;

/// `Ok(None)`: no range, serve everything. `Err(())`: unsatisfiable or malformed (416).
pub(super) fn parse(header: Option<&HeaderValue>, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(header) = header else {
        return Ok(None);
    };
    let spec = header
        .to_str()
        .map_err(drop)?
        .trim()
        .strip_prefix("bytes=")
        .ok_or(())?;
    if spec.contains(',') {
        return Err(());
    }
    let (first, last) = spec.split_once('-').ok_or(())?;
    let (first, last) = (first.trim(), last.trim());
    let range = if first.is_empty() {
        let suffix: u64 = last.parse().map_err(drop)?;
        size.saturating_sub(suffix)..size
    } else {
        let start: u64 = first.parse().map_err(drop)?;
        let end = if last.is_empty() {
            size
        } else {
            last.parse::<u64>()
                .map_err(drop)?
                .saturating_add(1)
                .min(size)
        };
        start..end
    };
    if range.start >= range.end || range.start >= size {
        return Err(());
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &str, size: u64) -> Result<Option<Range<u64>>, ()> {
        parse(Some(&HeaderValue::from_str(v).map_err(drop)?), size)
    }

    #[test]
    fn ranges() {
        assert_eq!(parse(None, 10), Ok(None));
        assert_eq!(p("bytes=3-", 10), Ok(Some(3..10)));
        assert_eq!(p("bytes=3-4", 10), Ok(Some(3..5)));
        assert_eq!(p("bytes=3-400", 10), Ok(Some(3..10)));
        assert_eq!(p("bytes=-4", 10), Ok(Some(6..10)));
        assert_eq!(p("bytes=10-", 10), Err(()));
        assert_eq!(p("bytes=5-2", 10), Err(()));
        assert_eq!(p("bytes=1-2,4-5", 10), Err(()));
        assert_eq!(p("items=1-2", 10), Err(()));
        assert_eq!(p("bytes=x-", 10), Err(()));
        assert_eq!(p("bytes=18446744073709551615-", 10), Err(()));
    }
}
