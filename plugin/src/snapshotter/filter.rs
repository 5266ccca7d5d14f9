//! containerd's filter language (`pkg/filters`), as `List` receives it: a filter is
//! `selector("," selector)*`, all of which must match; several filters match if any does.
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
//! Snapshots expose `kind` (`active`, `view`, `committed`), `name`, `parent` and `labels.<key>`,
//! as containerd's `adaptSnapshot` does. The scanner and parser follow containerd's, quirks
//! included (no spaces around `,`), so a filter means here what it means in containerd.

use regex::Regex;

use super::{Error, Info};

/// Parsed filters; matches when any of the alternatives does.
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
                parse(f).map_err(|reason| Error::Filter {
                    filter: f.clone(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Filter { any })
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let field = field(info, &self.path);
        match &self.op {
            Op::Present => field.is_some(),
            Op::Equal(v) => field == Some(v.as_str()),
            Op::NotEqual(v) => field.unwrap_or("") != v,
            Op::Matches(re) => re.is_match(field.unwrap_or("")),
        }
    }
}

fn field<'a>(info: &'a Info, path: &[String]) -> Option<&'a str> {
    match path.first()?.as_str() {
        "kind" => Some(info.kind.as_str()),
        "name" => Some(&info.name),
        "parent" => Some(&info.parent),
        "labels" => info.labels.get(&path[1..].join(".")).map(String::as_str),
        _ => None,
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
    use std::time::UNIX_EPOCH;

    use super::super::{Kind, Labels};
    use super::*;

    fn info(name: &str, kind: Kind, parent: &str, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.to_owned(),
            parent: parent.to_owned(),
            kind,
            created: UNIX_EPOCH,
            updated: UNIX_EPOCH,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Labels>(),
        }
    }

    fn matches(filters: &[&str], info: &Info) -> bool {
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        Filter::parse_all(&filters)
            .unwrap_or_else(|e| panic!("{e}"))
            .matches(info)
    }

    #[test]
    fn selectors_match_like_containerd() {
        let a = info(
            "a-wl",
            Kind::Active,
            "p-wl",
            &[("l", "2"), ("containerd.io/gc.root", "check-walk")],
        );
        assert!(matches(&[], &a));
        assert!(matches(&[""], &a));
        assert!(matches(
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
            &a
        ));
        assert!(matches(&["kind==active,labels.l==2"], &a));
        assert!(!matches(&["kind==view,labels.l==2"], &a));
        assert!(matches(&["kind==view", "name==a-wl"], &a));
        assert!(matches(&["name==a-wl,labels.l"], &a));
        assert!(matches(&[r#"parent!="""#], &a));
        assert!(!matches(&["labels.missing"], &a));
        assert!(matches(&["labels.missing!=x"], &a));
        assert!(matches(&["name~=^a-", "name==zzz"], &a));
        assert!(matches(&["name~=/w.$/"], &a));
        assert!(matches(&["parent==p-wl"], &a));
        assert!(
            matches(&["kind== active"], &a),
            "spaces before a value are skipped"
        );
        let no_labels = info("sha256:ab.cd", Kind::Committed, "", &[]);
        assert!(matches(&["name==sha256:ab.cd,kind==committed"], &no_labels));
        assert!(!matches(&["labels.l!=2,labels.l"], &no_labels));
    }

    #[test]
    fn bad_filters_are_invalid_arguments() {
        for bad in [
            "==x",
            "name==",
            "name=x",
            "name===x",
            "name==a b",
            "name ,x",
            "labels.\"unterminated",
            "name==\"a\\qb\"",
            "name~=(",
            "name==x\0",
            "labels.|alt|==x",
        ] {
            let result = Filter::parse_all(&[bad.to_owned()]);
            let err = result
                .err()
                .unwrap_or_else(|| panic!("{bad:?} must not parse"));
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
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
