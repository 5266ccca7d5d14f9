//! containerd's filter language (`pkg/filters`), as the snapshotter's `List` and the content
//! store's `List` and `ListStatuses` receive it: a filter is `selector("," selector)*`, all of
//! which must match; several filters match if any does.
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
//! The scanner and parser follow containerd's, quirks included (no spaces before `,`, a value
//! cannot start with `.`), so a filter means here what it means in containerd. What a field is
//! belongs to each listing: it implements [`Fields`] as containerd's adaptors do, and a field
//! it does not expose is never present. One deliberate difference: a `~=` regular expression
//! is compiled when the filter is parsed, so a bad one is an invalid argument rather than a
//! selector that silently matches nothing.

use std::borrow::Cow;

use regex::Regex;

use crate::labels::Labels;

/// Something filters can look into: the value at a field path, if it has one (containerd's
/// `filters.Adaptor`).
pub trait Fields {
    fn field(&self, path: &[String]) -> Option<Cow<'_, str>>;
}

/// The value of `labels.<key>` (the path after `labels`), as containerd's `checkMap`: keys may
/// contain dots, so the rest of the path is joined again.
pub(crate) fn label<'a>(labels: &'a Labels, key: &[String]) -> Option<Cow<'a, str>> {
    labels
        .get(&key.join("."))
        .map(|v| Cow::Borrowed(v.as_str()))
}

/// A filter that does not parse; containerd expects InvalidArgument for it.
#[derive(Debug, thiserror::Error)]
#[error("filter {filter:?}: {reason}")]
pub struct FilterError {
    /// The filter, cut to its first 256 characters.
    filter: String,
    reason: String,
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
    pub fn parse_all(filters: &[String]) -> Result<Filter, FilterError> {
        let any = filters
            .iter()
            .map(|f| {
                parse(f).map_err(|reason| FilterError {
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
        let field = field.as_deref();
        match &self.op {
            Op::Present => field.is_some(),
            Op::Equal(v) => field == Some(v.as_str()),
            Op::NotEqual(v) => field.unwrap_or("") != v,
            Op::Matches(re) => re.is_match(field.unwrap_or("")),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Token<'a> {
    Eof,
    Quoted(&'a str),
    Value(&'a str),
    Field(&'a str),
    Separator,
    Operator(&'a str),
    Illegal(&'static str),
    Other(char),
}

struct Scanner<'a> {
    input: &'a str,
    pos: usize,
    /// After an operator, unquoted text is a value rather than a field.
    value: bool,
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn is_value_char(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn bump_while(&mut self, f: fn(char) -> bool) {
        while self.peek().is_some_and(f) {
            self.bump();
        }
    }

    fn scan(&mut self) -> Token<'a> {
        loop {
            let start = self.pos;
            let Some(c) = self.bump() else {
                return Token::Eof;
            };
            match c {
                '\0' => return Token::Illegal("unexpected NUL"),
                '/' | '|' | '"' => return self.quoted(start, c),
                ',' | '.' => {
                    self.value = false;
                    return Token::Separator;
                }
                '=' | '!' | '~' => {
                    self.bump_while(|c| matches!(c, '=' | '!' | '~'));
                    self.value = true;
                    return Token::Operator(&self.input[start..self.pos]);
                }
                c if c.is_whitespace() => continue,
                _ if self.value => {
                    self.bump_while(is_value_char);
                    self.value = false;
                    return Token::Value(&self.input[start..self.pos]);
                }
                c if is_field_char(c) => {
                    self.bump_while(is_field_char);
                    return Token::Field(&self.input[start..self.pos]);
                }
                c => return Token::Other(c),
            }
        }
    }

    /// Scans to the closing `quote`; escapes are checked when unquoting.
    fn quoted(&mut self, start: usize, quote: char) -> Token<'a> {
        loop {
            match self.bump() {
                None | Some('\n' | '\0') => return Token::Illegal("quoted literal not terminated"),
                Some('\\') => {
                    if self.bump().is_none() {
                        return Token::Illegal("quoted literal not terminated");
                    }
                }
                Some(c) if c == quote => return Token::Quoted(&self.input[start..self.pos]),
                Some(_) => {}
            }
        }
    }
}

fn parse(input: &str) -> Result<Vec<Selector>, String> {
    if input.is_empty() {
        return Ok(Vec::new());
    }
    let mut s = Scanner {
        input,
        pos: 0,
        value: false,
    };
    let mut all = vec![selector(&mut s)?];
    loop {
        match s.peek() {
            Some(',') => {
                s.scan();
                all.push(selector(&mut s)?);
            }
            None => return Ok(all),
            Some(c) => return Err(format!("unexpected input {c:?} at byte {}", s.pos)),
        }
    }
}

fn selector(s: &mut Scanner<'_>) -> Result<Selector, String> {
    let mut path = vec![field_name(s)?];
    while s.peek() == Some('.') {
        s.scan();
        path.push(field_name(s)?);
    }
    if matches!(s.peek(), None | Some(',')) {
        return Ok(Selector {
            path,
            op: Op::Present,
        });
    }
    let op = match s.scan() {
        Token::Operator(op) => op,
        Token::Illegal(e) => return Err(e.to_owned()),
        _ => return Err(r#"expected an operator ("=="|"!="|"~=")"#.to_owned()),
    };
    let value = |s: &mut Scanner<'_>, alt: bool| match s.scan() {
        Token::Value(v) | Token::Field(v) => Ok(v.to_owned()),
        Token::Quoted(q) => unquote(q, alt),
        Token::Illegal(e) => Err(e.to_owned()),
        Token::Eof => Err("unexpected end of filter".to_owned()),
        _ => Err("expected value or quoted".to_owned()),
    };
    let op = match op {
        "==" => Op::Equal(value(s, false)?),
        "!=" => Op::NotEqual(value(s, false)?),
        "~=" => {
            let re = value(s, true)?;
            Op::Matches(Regex::new(&re).map_err(|e| format!("regular expression: {e}"))?)
        }
        other => return Err(format!("unsupported operator {other:?}")),
    };
    Ok(Selector { path, op })
}

fn field_name(s: &mut Scanner<'_>) -> Result<String, String> {
    match s.scan() {
        Token::Field(f) => Ok(f.to_owned()),
        Token::Quoted(q) => unquote(q, false),
        Token::Illegal(e) => Err(e.to_owned()),
        _ => Err("expected field or quoted".to_owned()),
    }
}

/// Go's `strconv.Unquote`, extended as containerd does with `/…/` and `|…|` (only where
/// `alt` allows them: after `~=`).
fn unquote(quoted: &str, alt: bool) -> Result<String, String> {
    let bad = || format!("invalid quoted string {quoted}");
    let quote = quoted.chars().next().ok_or_else(bad)?;
    if !alt && quote != '"' {
        return Err("invalid quote encountered".to_owned());
    }
    if quoted.len() < 2 || !quoted.ends_with(quote) {
        return Err(bad());
    }
    let inner = &quoted[1..quoted.len() - 1];
    let mut out = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == quote || c == '\n' {
            return Err(bad());
        }
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let e = chars.next().ok_or_else(bad)?;
        let mut hex = |n: usize| -> Result<u32, String> {
            let digits: String = chars.by_ref().take(n).collect();
            if digits.len() != n {
                return Err(bad());
            }
            u32::from_str_radix(&digits, 16).map_err(|_| bad())
        };
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
                out.push(u8::try_from(hex(2)?).map_err(|_| bad())?);
                continue;
            }
            'u' => char::from_u32(hex(4)?).ok_or_else(bad)?,
            'U' => char::from_u32(hex(8)?).ok_or_else(bad)?,
            '0'..='7' => {
                let rest: String = chars.by_ref().take(2).collect();
                let v = u32::from_str_radix(&format!("{e}{rest}"), 8).map_err(|_| bad())?;
                if rest.len() != 2 || v > 255 {
                    return Err(bad());
                }
                out.push(u8::try_from(v).map_err(|_| bad())?);
                continue;
            }
            '\'' | '"' | '|' | '/' if e == quote => e,
            _ => return Err(bad()),
        };
        let mut buf = [0; 4];
        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// An item exposing exactly the paths it is given, as "a.b.c".
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
            ("name", "sha256:ab.cd"),
            ("kind", "active"),
            ("parent", ""),
            ("labels.containerd.io/gc.root", "x"),
            ("labels.l", "2"),
        ]));
        assert!(matches(&[], &item));
        assert!(matches(&[""], &item));
        assert!(matches(&[r#"labels."containerd.io/gc.root"==x"#], &item));
        assert!(matches(&["name==sha256:ab.cd,labels.l==2"], &item));
        assert!(matches(&["name == sha256:ab.cd, labels.l"], &item));
        assert!(!matches(&["kind==view,labels.l==2"], &item));
        assert!(matches(&["labels.l==3", "labels.l==2"], &item));
        assert!(!matches(&["labels.missing"], &item));
        assert!(matches(&["labels.missing!=x"], &item));
        assert!(!matches(&["labels.l!=2,labels.l"], &item));
        assert!(matches(&["parent"], &item), "an empty value is present");
        assert!(matches(&[r#"parent!="x""#], &item));
        assert!(matches(&["kind== active"], &item), "spaces before a value");
        assert!(matches(&["name~=^sha256:", "name==zzz"], &item));
        assert!(matches(&["name~=/d$/"], &item));
        assert!(matches(&["kind~=|^act|"], &item));
        assert!(matches(&[r#"labels.l=="\x32""#], &item));
        assert!(matches(&[r#"labels.l=="\062""#], &item));
    }

    #[test]
    fn unknown_fields_are_never_present() {
        let item = Item(HashMap::from([("name", "a")]));
        assert!(!matches(&["unknown"], &item));
        assert!(!matches(&["unknown==x"], &item));
        assert!(!matches(&["name==a,unknown==x"], &item));
        // As in containerd: an absent field compares as "".
        assert!(matches(&["unknown!=x"], &item));
        assert!(matches(&["unknown~=^$"], &item));
    }

    #[test]
    fn bad_filters_do_not_parse() {
        for bad in [
            "==x",
            "name==",
            "name=x",
            "name===x",
            "name==a b",
            "name ,x",
            "name==a ,labels.l",
            "labels.\"unterminated",
            "name==\"a\\qb\"",
            "name~=(",
            "name==x\0",
            "labels.|alt|==x",
            "name==/alt/",
            "name==.x",
            "name==\"\\xff\"",
        ] {
            assert!(
                Filter::parse_all(&[bad.to_owned()]).is_err(),
                "{bad:?} must not parse"
            );
        }
        let long = format!("name=={}", "x ".repeat(1000));
        let err = Filter::parse_all(&["name".to_owned(), long]).err();
        assert!(
            err.is_some_and(|e| e.to_string().len() < 400),
            "a long filter is cut in the error"
        );
    }

    #[test]
    fn unquote_follows_go() {
        assert_eq!(
            unquote(r#""a\"b\n\x41\u00e9\101""#, false).ok().as_deref(),
            Some("a\"b\nAéA")
        );
        assert_eq!(unquote("/a\\/b/", true).ok().as_deref(), Some("a/b"));
        assert!(unquote("/a/", false).is_err());
        assert!(unquote(r#""\xff""#, false).is_err(), "not UTF-8");
        assert!(unquote(r#""\777""#, false).is_err());
    }
}
