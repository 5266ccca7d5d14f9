//! Checks on the names that end up in a registry URL: registry host, repository and manifest
//! reference.
//!
//! They arrive from containerd (`?ns=` and the mirror's request path) and from image references a
//! user typed, so they are checked against the OCI distribution grammar before any URL is built:
//! a repository like `../../x` or a registry like `evil.example/@host` never reaches the network.

use std::net::Ipv6Addr;

use super::Error;
use crate::Digest;

/// Distribution caps repository names at 255 characters.
const MAX_REPOSITORY_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// `host[:port]`, a DNS name, IPv4 address or bracketed IPv6 address, as containerd names
/// registries (`docker.io`, `127.0.0.1:5000`, `[::1]:5000`).
pub(super) fn check_registry(registry: &str) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidInput {
        what: "registry",
        value: registry.to_owned(),
        reason,
    };
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or(invalid("unclosed '[' in IPv6 address"))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| invalid("not an IPv6 address inside [ ]"))?;
        match after {
            "" => (None, None),
            _ => (
                None,
                Some(after.strip_prefix(':').ok_or(invalid("junk after ']'"))?),
            ),
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        if host.is_empty() || host.len() > 253 {
            return Err(invalid("host must have 1 to 253 characters"));
        }
        if !host.split('.').all(is_dns_label) {
            return Err(invalid(
                "must be host[:port] (letters, digits, '-' and '.'; no scheme or path)",
            ));
        }
    }
    if let Some(port) = port {
        let digits =
            !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
        if !digits || port.parse::<u16>().is_err() {
            return Err(invalid("port must be a number from 0 to 65535"));
        }
    }
    Ok(())
}

fn is_dns_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Components of lowercase letters and digits joined by `.`, `_`, `__` or dashes, separated by
/// `/`: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub(super) fn check_repository(repository: &str) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidInput {
        what: "repository",
        value: repository.chars().take(MAX_REPOSITORY_LEN + 1).collect(),
        reason,
    };
    if repository.is_empty() || repository.len() > MAX_REPOSITORY_LEN {
        return Err(invalid("must have 1 to 255 characters"));
    }
    if !repository.split('/').all(is_path_component) {
        return Err(invalid(
            "must be lowercase letters and digits joined by '.', '_', '__', '-' or '/'",
        ));
    }
    Ok(())
}

fn is_path_component(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = component.as_bytes();
    let mut i = 0;
    loop {
        let run = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == run {
            // Empty component, or one that starts or ends with a separator.
            return false;
        }
        if i == b.len() {
            return true;
        }
        let sep_start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[sep_start..i];
        if !(sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|c| *c == b'-')) {
            return false;
        }
    }
}

/// A tag (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`) or a digest.
pub(super) fn check_reference(reference: &str) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidInput {
        what: "manifest reference",
        value: reference.chars().take(MAX_TAG_LEN + 1).collect(),
        reason,
    };
    if reference.contains(':') {
        return reference
            .parse::<Digest>()
            .map(|_| ())
            .map_err(|_| invalid("a digest reference must be sha256:<64 lowercase hex>"));
    }
    let b = reference.as_bytes();
    let word = |c: &u8| c.is_ascii_alphanumeric() || *c == b'_';
    let valid = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && word(&b[0])
        && b.iter().all(|c| word(c) || *c == b'.' || *c == b'-');
    if !valid {
        return Err(invalid(
            "a tag must be 1 to 128 of [A-Za-z0-9_.-] and not start with '.' or '-'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_registries_as_containerd_names_them() -> anyhow::Result<()> {
        for ok in [
            "docker.io",
            "127.0.0.1:5000",
            "registry-1.docker.io",
            "[::1]:5000",
            "[::1]",
            "Localhost:1",
        ] {
            check_registry(ok)?;
        }
        Ok(())
    }

    #[test]
    fn rejects_registries_that_are_not_plain_hosts() {
        for bad in [
            "",
            "https://docker.io",
            "docker.io/library",
            "user@docker.io",
            "docker .io",
            "docker.io\n",
            "host:",
            "host:99999",
            "host:5000:1",
            "-host",
            "a..b",
            "[::1",
            "[nothost]:5000",
            "[::1]5000",
        ] {
            assert!(check_registry(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn repository_follows_the_distribution_grammar() -> anyhow::Result<()> {
        for ok in [
            "busybox",
            "library/busybox",
            "a/b/c",
            "my-app",
            "my--app",
            "a.b",
            "a_b",
            "a__b",
            "0",
        ] {
            check_repository(ok)?;
        }
        for bad in [
            "",
            "Library/busybox",
            "library//busybox",
            "/busybox",
            "busybox/",
            "../etc",
            "a___b",
            "a._b",
            "a-",
            "_a",
            "a b",
            "a?b",
            "a%2fb",
            "bus\u{e9}box",
            &"a".repeat(256),
        ] {
            assert!(check_repository(bad).is_err(), "{bad:?} accepted");
        }
        Ok(())
    }

    #[test]
    fn reference_is_a_tag_or_digest() -> anyhow::Result<()> {
        let digest = Digest::of(b"x").to_string();
        for ok in [
            "latest",
            "1.36.1",
            "_x",
            "v1-rc.2",
            &"a".repeat(128),
            &digest,
        ] {
            check_reference(ok)?;
        }
        for bad in [
            "",
            ".x",
            "-x",
            "a/b",
            "a?b",
            "sha256:abc",
            "md5:00",
            &"a".repeat(129),
        ] {
            assert!(check_reference(bad).is_err(), "{bad:?} accepted");
        }
        Ok(())
    }
}
