//! A peer's side of the tracker API.

use std::time::Duration;

use super::api::{AnnounceRequest, AnnounceResponse, PublishRequest, ReportRequest};
use crate::digest::Digest;
use crate::metainfo::Metainfo;

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("tracker at {url} unreachable")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("tracker at {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("tracker at {url} sent an invalid answer")]
    Invalid {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// Talks to one tracker over HTTP. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TrackerClient {
    base: String,
    http: reqwest::Client,
}

impl TrackerClient {
    /// `base` is like `http://10.0.0.1:7070`.
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, TrackerError> {
        let resp = req
            .send()
            .await
            .map_err(|source| TrackerError::Unreachable {
                url: url.to_owned(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        Err(TrackerError::Status {
            url: url.to_owned(),
            status: status.as_u16(),
            body,
        })
    }

    pub async fn announce(&self, req: &AnnounceRequest) -> Result<AnnounceResponse, TrackerError> {
        let url = format!("{}/announce", self.base);
        let resp = self.send(self.http.post(&url).json(req), &url).await?;
        let mut answer: AnnounceResponse =
            resp.json().await.map_err(|source| TrackerError::Invalid {
                url: url.clone(),
                source,
            })?;
        // Never trust a layout we have not checked.
        answer.metainfo = answer.metainfo.filter(|m| m.validate().is_ok());
        Ok(answer)
    }

    /// The tracker's metainfo for `digest`, `None` if it has none.
    pub async fn metainfo(&self, digest: &Digest) -> Result<Option<Metainfo>, TrackerError> {
        let url = format!("{}/metainfo/{digest}", self.base);
        match self.send(self.http.get(&url), &url).await {
            Ok(resp) => {
                let meta: Metainfo = resp.json().await.map_err(|source| TrackerError::Invalid {
                    url: url.clone(),
                    source,
                })?;
                Ok(Some(meta).filter(|m| m.validate().is_ok() && m.digest == *digest))
            }
            Err(TrackerError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn publish(&self, digest: &Digest, req: &PublishRequest) -> Result<(), TrackerError> {
        let url = format!("{}/metainfo/{digest}/pieces", self.base);
        self.send(self.http.post(&url).json(req), &url)
            .await
            .map(drop)
    }

    pub async fn report(&self, req: &ReportRequest) -> Result<(), TrackerError> {
        let url = format!("{}/report", self.base);
        self.send(self.http.post(&url).json(req), &url)
            .await
            .map(drop)
    }
}
