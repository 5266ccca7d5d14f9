//! containerd's filter language (`pkg/filters`), as `List` and `ListStatuses` receive it: a
//! filter is `selector("," selector)*`, all of which must match; several filters match if any
//! does.
//!
//! ```text
//! selector  := fieldpath (operator value)?      no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="               ~= is a regular expression
//! value     := quoted | [^\s,]+
//! quoted    := Go string syntax in "…", or /…/ and |…| after ~=
//! ```
//!
//! Blobs expose `digest` and `labels.<key>`, ingests `ref`, as containerd's `AdaptInfo` and
//! `adaptStatus` do. As in containerd, a field nobody exposes is simply never present, while a
//! filter that does not parse is an invalid argument. The matching is generic over [`Fields`],
//! so any listing can use it.

use std::borrow::Cow;

use regex::Regex;

use super::Error;

/// Something filters can look into: the value at a field path, if it has one.
pub(crate) trait Fields {
    fn field(&self, path: &[String]) -> Option<Cow<'_, str>>;
}

/// Parsed filters; matches when any of the alternatives does (or when there are none).
#[derive(Debug)]
pub(crate) struct Filter {
    any: Vec<Vec<Selector>>,
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Filter {
    pub fn parse_all(filters: &[String]) -> Result<Filter, Error> {
        let any = filters
            .iter()
            .map(|f| {
                Parser { s: f, pos: 0 }
                    .filter()
                    .map_err(|reason| Error::Filter {
                        filter: f.chars().take(256).collect(),
                        reason,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Filter { any })
    }

    pub fn matches(&self, item: &impl Fields) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(item)))
    }
}

impl Selector {
    fn matches(&self, item: &impl Fields) -> bool {
        let field = item.field(&self.path);
        match &self.op {
            Op::Present => field.is_some(),
            Op::Equal(v) => field.as_deref() == Some(v.as_str()),
            Op::NotEqual(v) => field.as_deref().unwrap_or("") != v,
            Op::Matches(re) => re.is_match(field.as_deref().unwrap_or("")),
        }
    }
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek().filter(|c| c.is_whitespace()) {
            self.pos += c.len_utf8();
        }
    }

    /// Takes characters while `f` holds; returns them.
    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &str {
        let start = self.pos;
        while let Some(c) = self.peek().filter(|c| f(*c)) {
            self.pos += c.len_utf8();
        }
        &self.s[start..self.pos]
    }

    fn filter(&mut self) -> Result<Vec<Selector>, String> {
        if self.s.is_empty() {
            return Ok(Vec::new());
        }
        let mut all = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(all),
                Some(',') => {
                    self.pos += 1;
                    all.push(self.selector()?);
                }
                Some(c) => return Err(format!("unexpected {c:?} at byte {}", self.pos)),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        if matches!(self.peek(), None | Some(',')) {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        }
        self.skip_space();
        let op = self.take_while(|c| matches!(c, '=' | '!' | '~')).to_owned();
        let op = match op.as_str() {
            "==" => Op::Equal(self.value(false)?),
            "!=" => Op::NotEqual(self.value(false)?),
            "~=" => {
                let re = self.value(true)?;
                Op::Matches(Regex::new(&re).map_err(|e| format!("regular expression: {e}"))?)
            }
            "" => return Err(r#"expected an operator ("=="|"!="|"~=")"#.to_owned()),
            other => return Err(format!("unsupported operator {other:?}")),
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, String> {
        self.skip_space();
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if is_field_char(c) => Ok(self.take_while(is_field_char).to_owned()),
            Some(c) => Err(format!("expected field or quoted, found {c:?}")),
            None => Err("expected field or quoted, found the end".to_owned()),
        }
    }

    fn value(&mut self, alt_quotes: bool) -> Result<String, String> {
        self.skip_space();
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(q @ ('/' | '|')) if alt_quotes => self.quoted(q),
            Some(c) if c != ',' && !c.is_control() => Ok(self
                .take_while(|c| c != ',' && !c.is_whitespace() && !c.is_control())
                .to_owned()),
            _ => Err("expected value or quoted".to_owned()),
        }
    }

    /// A literal in Go string syntax between `quote`s (containerd's `unquote`).
    fn quoted(&mut self, quote: char) -> Result<String, String> {
        let bad = || "invalid quoted string".to_owned();
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let c = self
                .peek()
                .ok_or_else(|| "quoted literal not terminated".to_owned())?;
            self.pos += c.len_utf8();
            if c == quote {
                return String::from_utf8(out).map_err(|_| bad());
            }
            if c == '\n' || c == '\0' {
                return Err("quoted literal not terminated".to_owned());
            }
            if c != '\\' {
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                continue;
            }
            let e = self.peek().ok_or_else(bad)?;
            self.pos += e.len_utf8();
            let ch = match e {
                'a' => '\x07',
                'b' => '\x08',
                'f' => '\x0c',
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                'v' => '\x0b',
                '\\' => '\\',
                'x' => {
                    out.push(u8::try_from(self.digits(2, 16)?).map_err(|_| bad())?);
                    continue;
                }
                'u' => char::from_u32(self.digits(4, 16)?).ok_or_else(bad)?,
                'U' => char::from_u32(self.digits(8, 16)?).ok_or_else(bad)?,
                '0'..='7' => {
                    self.pos -= 1;
                    out.push(u8::try_from(self.digits(3, 8)?).map_err(|_| bad())?);
                    continue;
                }
                c if c == quote => c,
                _ => return Err(bad()),
            };
            out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
        }
    }

    fn digits(&mut self, n: usize, radix: u32) -> Result<u32, String> {
        let end = self.pos + n;
        let digits = self.s.get(self.pos..end).ok_or("invalid escape")?;
        if !digits.chars().all(|c| c.is_digit(radix)) {
            return Err("invalid escape".to_owned());
        }
        self.pos = end;
        u32::from_str_radix(digits, radix).map_err(|_| "invalid escape".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Item(HashMap<&'static str, &'static str>);

    impl Fields for Item {
        fn field(&self, path: &[String]) -> Option<Cow<'_, str>> {
            self.0
                .get(path.join(".").as_str())
                .map(|v| Cow::Borrowed(*v))
        }
    }

    fn matches(filters: &[&str], item: &Item) -> bool {
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        Filter::parse_all(&filters)
            .unwrap_or_else(|e| panic!("{e}"))
            .matches(item)
    }

    #[test]
    fn selectors_match_like_containerd() {
        let item = Item(HashMap::from([
            ("digest", "sha256:ab"),
            ("labels.containerd.io/gc.root", "x"),
            ("labels.l", "2"),
        ]));
        assert!(matches(&[], &item));
        assert!(matches(&[""], &item));
        assert!(matches(&[r#"labels."containerd.io/gc.root"==x"#], &item));
        assert!(matches(&["digest==sha256:ab,labels.l==2"], &item));
        assert!(matches(&["digest == sha256:ab, labels.l"], &item));
        assert!(!matches(&["digest==sha256:ab,labels.l==3"], &item));
        assert!(matches(&["labels.l==3", "labels.l==2"], &item));
        assert!(!matches(&["labels.missing"], &item));
        assert!(
            !matches(&["unknown==x"], &item),
            "unknown fields never match"
        );
        assert!(matches(&["labels.missing!=x"], &item));
        assert!(matches(&["digest~=^sha256:"], &item));
        assert!(matches(&["digest~=/b$/"], &item));
        assert!(matches(&[r#"labels.l=="\x32""#], &item));
        assert!(matches(&[r#"labels.l=="\062""#], &item));
    }

    #[test]
    fn bad_filters_are_invalid_arguments() {
        for bad in [
            "==x",
            "digest==",
            "digest=x",
            "digest===x",
            "digest==a b",
            "digest==a ,labels.l",
            "labels.\"unterminated",
            "digest==\"a\\qb\"",
            "digest~=(",
            "digest==x\0",
            "labels.|alt|==x",
            "digest==\"\\xff\"",
        ] {
            let err = Filter::parse_all(&[bad.to_owned()])
                .err()
                .unwrap_or_else(|| panic!("{bad:?} must not parse"));
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }
}
