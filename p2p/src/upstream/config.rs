//! The `[registry]` section of the node config: how the upstream client reaches registries
//! (credentials file, plain-http hosts, retries and timeouts).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::name;

/// More retries than this would hold a piece request for minutes; the swarm has other sources.
const MAX_RETRIES: u32 = 20;

/// `[registry]` config section.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// A docker `config.json` with registry credentials. `None` means `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`, if it exists.
    pub docker_config: Option<PathBuf>,
    /// Registries (`127.0.0.1:5000`, as containerd names them) reached over plain http.
    pub insecure: Vec<String>,
    /// How many times a request is retried after a connection error, timeout, 429 or 5xx.
    pub retries: u32,
    pub connect_timeout_ms: u64,
    /// Limit for one whole request, body included.
    pub request_timeout_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            docker_config: None,
            insecure: Vec::new(),
            retries: 4,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 60_000,
        }
    }
}

impl RegistryConfig {
    /// Says which field is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(path) = &self.docker_config
            && path.as_os_str().is_empty()
        {
            return Err("[registry] docker_config: must be a path to a config.json".into());
        }
        for (i, host) in self.insecure.iter().enumerate() {
            name::check_registry(host).map_err(|e| format!("[registry] insecure[{i}]: {e}"))?;
        }
        if self.retries > MAX_RETRIES {
            return Err(format!(
                "[registry] retries: {} is more than the maximum of {MAX_RETRIES}",
                self.retries
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err("[registry] connect_timeout_ms: must be more than 0".into());
        }
        if self.request_timeout_ms < self.connect_timeout_ms {
            return Err(format!(
                "[registry] request_timeout_ms: {} is shorter than connect_timeout_ms {}",
                self.request_timeout_ms, self.connect_timeout_ms
            ));
        }
        Ok(())
    }

    pub(super) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(super) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() -> anyhow::Result<()> {
        let cfg = RegistryConfig::default();
        cfg.validate().map_err(anyhow::Error::msg)?;
        assert_eq!(
            (cfg.retries, cfg.connect_timeout_ms, cfg.request_timeout_ms),
            (4, 5_000, 60_000)
        );
        Ok(())
    }

    #[test]
    fn validate_names_the_bad_field() {
        let bad_host = RegistryConfig {
            insecure: vec!["127.0.0.1:5000".into(), "http://127.0.0.1:5001".into()],
            ..Default::default()
        };
        let err = bad_host.validate().err().unwrap_or_default();
        assert!(
            err.contains("insecure[1]") && err.contains("http://127.0.0.1:5001"),
            "{err}"
        );

        let bad_timeout = RegistryConfig {
            connect_timeout_ms: 10_000,
            request_timeout_ms: 1_000,
            ..Default::default()
        };
        let err = bad_timeout.validate().err().unwrap_or_default();
        assert!(err.contains("request_timeout_ms"), "{err}");

        let bad_retries = RegistryConfig {
            retries: 1_000,
            ..Default::default()
        };
        assert!(bad_retries.validate().is_err());
    }

    #[test]
    fn missing_fields_take_defaults_and_unknown_fields_are_rejected() -> anyhow::Result<()> {
        let cfg: RegistryConfig = serde_json::from_str(r#"{"insecure": ["127.0.0.1:5000"]}"#)?;
        assert_eq!(cfg.insecure, ["127.0.0.1:5000"]);
        assert_eq!(cfg.retries, 4);
        assert!(serde_json::from_str::<RegistryConfig>(r#"{"retry": 3}"#).is_err());
        Ok(())
    }
}
