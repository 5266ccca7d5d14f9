//! Registry logins read from a docker `config.json`, the file `docker login`, `skopeo login` and
//! `nerdctl login` write, so a node can pull private images with the credentials its operator
//! already has.
//!
//! Only inline logins (`auths.<host>.auth` or `username`/`password`) are read; credential helpers
//! (`credsStore`, `credHelpers`) are not run, and a warning says so. The file is read once, when
//! the client is built.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde::Deserialize;

use super::Error;

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Login {
    pub username: String,
    pub password: String,
}

impl Login {
    /// The `Authorization` header value for HTTP basic auth.
    pub fn basic_header(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password);
        format!("Basic {}", STANDARD.encode(pair))
    }
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Logins by registry, keyed as containerd names registries (`docker.io`, `host:port`).
#[derive(Default)]
pub(super) struct Credentials {
    logins: HashMap<String, Login>,
    source: Option<PathBuf>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut registries: Vec<_> = self.logins.keys().collect();
        registries.sort();
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .field("registries", &registries)
            .finish()
    }
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl Credentials {
    /// Reads `path`, or the default docker config if there is one. A file that is named
    /// explicitly must exist; any file that exists must parse.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let (path, required) = match path {
            Some(p) => (p.to_owned(), true),
            None => match default_path() {
                Some(p) => (p, false),
                None => return Ok(Self::default()),
            },
        };
        match std::fs::read(&path) {
            Ok(json) => Self::parse(&path, &json),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(source) => Err(Error::DockerConfigRead { path, source }),
        }
    }

    pub fn parse(path: &Path, json: &[u8]) -> Result<Self, Error> {
        let invalid = |reason: String| Error::DockerConfigInvalid {
            path: path.to_owned(),
            reason,
        };
        let file: DockerConfigFile = serde_json::from_slice(json)
            .map_err(|e| invalid(format!("not a docker config.json: {e}")))?;
        if file.creds_store.is_some() || !file.cred_helpers.is_empty() {
            tracing::warn!(
                path = %path.display(),
                "docker credential helpers (credsStore, credHelpers) are not supported; \
                 registries that only have helper logins are accessed anonymously"
            );
        }
        let mut logins = HashMap::new();
        for (key, entry) in file.auths {
            let login = match (
                entry.auth.as_deref().map(str::trim),
                entry.username,
                entry.password,
            ) {
                (Some(auth), _, _) if !auth.is_empty() => decode_auth(auth)
                    .map_err(|reason| invalid(format!("auths.{key:?}.auth: {reason}")))?,
                (_, Some(username), Some(password)) => Login { username, password },
                // `{}`: a login kept by a credential helper.
                _ => continue,
            };
            logins.entry(registry_of(&key)).or_insert(login);
        }
        Ok(Self {
            logins,
            source: Some(path.to_owned()),
        })
    }

    pub fn get(&self, registry: &str) -> Option<&Login> {
        self.logins.get(&registry_of(registry))
    }
}

fn default_path() -> Option<PathBuf> {
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker"),
    };
    Some(dir.join("config.json"))
}

/// `auth` is base64 of `user:password`; the password may itself contain `:`.
fn decode_auth(auth: &str) -> Result<Login, String> {
    let raw = STANDARD
        .decode(auth)
        .or_else(|_| STANDARD_NO_PAD.decode(auth))
        .map_err(|_| "not valid base64".to_owned())?;
    let pair = String::from_utf8(raw).map_err(|_| "decodes to non-UTF-8 text".to_owned())?;
    let (username, password) = pair
        .split_once(':')
        .ok_or_else(|| "does not decode to user:password".to_owned())?;
    Ok(Login {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// Maps a `config.json` key (`https://index.docker.io/v1/`, `http://host:5000`, `host:5000`) to
/// the registry name containerd uses.
fn registry_of(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn reads_auth_and_username_password_logins() -> anyhow::Result<()> {
        let json = format!(
            r#"{{
              "auths": {{
                "https://index.docker.io/v1/": {{"auth": "{hub}"}},
                "127.0.0.1:5000": {{"username": "bob", "password": "pw"}},
                "http://Registry.Example:443/v2/": {{"auth": "{colon}"}},
                "helper.example": {{}}
              }},
              "credsStore": "desktop",
              "HttpHeaders": {{"User-Agent": "x"}}
            }}"#,
            hub = b64("alice:s3cret"),
            colon = b64("carol:pa:ss"),
        );
        let creds = Credentials::parse(Path::new("config.json"), json.as_bytes())?;
        let hub = creds
            .get("docker.io")
            .ok_or_else(|| anyhow::anyhow!("no docker.io login"))?;
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("alice", "s3cret")
        );
        assert_eq!(
            creds.get("127.0.0.1:5000").map(|l| l.password.as_str()),
            Some("pw")
        );
        assert_eq!(
            creds
                .get("registry.example:443")
                .map(|l| l.password.as_str()),
            Some("pa:ss")
        );
        assert!(creds.get("helper.example").is_none());
        assert!(creds.get("other.example").is_none());
        assert_eq!(hub.basic_header(), format!("Basic {}", b64("alice:s3cret")));
        assert!(!format!("{creds:?} {hub:?}").contains("s3cret"));
        Ok(())
    }

    #[test]
    fn broken_files_are_errors_not_anonymous_access() {
        for bad in [
            "not json".to_owned(),
            r#"{"auths": {"h": {"auth": "!!!"}}}"#.to_owned(),
            format!(r#"{{"auths": {{"h": {{"auth": "{}"}}}}}}"#, b64("nocolon")),
        ] {
            let result = Credentials::parse(Path::new("/etc/docker.json"), bad.as_bytes());
            let msg = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("/etc/docker.json"), "{bad:?}: {msg:?}");
        }
    }

    #[test]
    fn explicit_file_must_exist_but_default_may_not() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let missing = dir.path().join("config.json");
        assert!(matches!(
            Credentials::load(Some(&missing)),
            Err(Error::DockerConfigRead { .. })
        ));
        std::fs::write(
            &missing,
            format!(r#"{{"auths":{{"h:1":{{"auth":"{}"}}}}}}"#, b64("u:p")),
        )?;
        assert!(Credentials::load(Some(&missing))?.get("h:1").is_some());
        Ok(())
    }
}
