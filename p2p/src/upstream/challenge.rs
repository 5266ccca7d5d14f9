//! A lenient parser for `WWW-Authenticate` headers (RFC 7235 challenges), the registry's way of
//! saying how to authenticate: `Bearer realm="https://auth.docker.io/token",service="..."`.
//!
//! The header comes from the network, so the parser takes any bytes: quoted values may hold
//! commas, spaces and escapes, unquoted values run to the next comma or space, and whatever does
//! not parse is skipped. It never panics and always makes progress.

/// One challenge of a `WWW-Authenticate` header: `Bearer realm="...",service="..."`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Challenge {
    /// Lowercase, since schemes are case-insensitive.
    pub scheme: String,
    /// Names lowercase, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses RFC 7235 challenges leniently: quoted values may hold commas and escapes, unquoted
/// values run to the next comma or space, and anything unparsable is skipped, never a panic.
pub(super) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut c = Cursor {
        s: header.as_bytes(),
        pos: 0,
    };
    let mut challenges = Vec::new();
    loop {
        c.skip_while(|b| b == b',' || is_space(b));
        if c.at_end() {
            return challenges;
        }
        let scheme = c.token();
        if scheme.is_empty() {
            c.pos += 1; // Garbage before a scheme: step over it.
            continue;
        }
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        loop {
            c.skip_while(|b| b == b',' || is_space(b));
            let start = c.pos;
            let name = c.token();
            if name.is_empty() {
                // End of input, or garbage: resynchronise at the next comma.
                c.skip_while(|b| b != b',');
                if c.at_end() {
                    break;
                }
                continue;
            }
            c.skip_while(is_space);
            if c.peek() != Some(b'=') {
                // A bare token is the next challenge's scheme.
                c.pos = start;
                break;
            }
            c.pos += 1;
            c.skip_while(is_space);
            let value = if c.peek() == Some(b'"') {
                c.quoted()
            } else {
                c.unquoted()
            };
            challenge.params.push((name.to_ascii_lowercase(), value));
        }
        challenges.push(challenge);
    }
}

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_while(&mut self, keep: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&keep) {
            self.pos += 1;
        }
    }

    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> String {
        let start = self.pos;
        self.skip_while(keep);
        String::from_utf8_lossy(&self.s[start..self.pos]).into_owned()
    }

    /// An RFC 7230 token.
    fn token(&mut self) -> String {
        self.take_while(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    }

    fn unquoted(&mut self) -> String {
        self.take_while(|b| b != b',' && !is_space(b))
    }

    /// A quoted string starting at `"`; an unterminated one runs to the end.
    fn quoted(&mut self) -> String {
        let mut out = Vec::new();
        self.pos += 1;
        while let Some(b) = self.peek() {
            self.pos += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(escaped) = self.peek() {
                        out.push(escaped);
                        self.pos += 1;
                    }
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.into(),
            params: params
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn parses_docker_hub_bearer_challenge() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#;
        assert_eq!(
            parse_challenges(header),
            [challenge(
                "bearer",
                &[
                    ("realm", "https://auth.docker.io/token"),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/busybox:pull"),
                ]
            )]
        );
    }

    #[test]
    fn quoted_values_keep_commas_escapes_and_spaces() {
        let header = r#"bearer  Realm = "https://a/t?x=1,2" , scope="repository:a:pull,push repository:b:pull", err="say \"hi\"""#;
        let parsed = parse_challenges(header);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].param("realm"), Some("https://a/t?x=1,2"));
        assert_eq!(
            parsed[0].param("scope"),
            Some("repository:a:pull,push repository:b:pull")
        );
        assert_eq!(parsed[0].param("err"), Some(r#"say "hi""#));
    }

    #[test]
    fn splits_several_challenges_in_one_header() {
        let parsed = parse_challenges(
            r#"Basic realm="Registry Realm", Bearer realm=https://x/token,service=x"#,
        );
        assert_eq!(
            parsed,
            [
                challenge("basic", &[("realm", "Registry Realm")]),
                challenge("bearer", &[("realm", "https://x/token"), ("service", "x")]),
            ]
        );
        let bare = parse_challenges("Negotiate, Basic");
        assert_eq!(bare, [challenge("negotiate", &[]), challenge("basic", &[])]);
    }

    #[test]
    fn garbage_never_panics_or_loops() {
        for junk in [
            "",
            ",,,",
            "=",
            "\"",
            "Bearer realm=",
            "Bearer realm=\"unterminated",
            "Bearer realm=\"x\\",
            "Bearer ==\"a\",,=b realm=\"r\"",
            "\u{e9}\u{0}Bearer realm=\"\u{1F600}\"",
            "Bearer , , realm",
        ] {
            let _ = parse_challenges(junk);
        }
        assert_eq!(
            parse_challenges("Bearer realm=\"unterminated")[0].param("realm"),
            Some("unterminated")
        );
    }
}
