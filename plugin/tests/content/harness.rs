//! Starts the content store in-process on a Unix socket in a tempdir, as `shoal node` serves it
//! to containerd, and talks to it with containerd-client's real `ContentClient`; [`Session`]
//! speaks the Write conversation as containerd's proxy writer does.

use std::path::Path;
use std::time::{Duration, Instant};

use containerd_client::services::v1::{self as api, WriteAction, content_client::ContentClient};
use containerd_client::with_namespace;
use prost_types::FieldMask;
use shoal_p2p::Digest;
use shoal_p2p::store::{BlobStore, StoreConfig};
use shoal_plugin::content::{ContentConfig, ContentStore, service};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

pub use crate::common::{Labels, blob, code, labels};
use crate::common::{Served, serve};

/// A running content service and a client connected to it.
pub struct Node {
    client: ContentClient<Channel>,
    served: Served,
}

impl Node {
    /// Opens the blob store and content store under `dir` and serves them on `dir/shoal.sock`.
    pub async fn start(dir: &Path) -> anyhow::Result<Node> {
        let store = BlobStore::open(&StoreConfig {
            root: dir.join("store"),
            capacity: 1 << 30,
        })?;
        let content = ContentStore::open(
            store,
            &dir.join("content.redb"),
            None,
            ContentConfig::default(),
        )?;
        let (served, channel) =
            serve(&dir.join("shoal.sock"), Routes::new(service(content))).await?;
        Ok(Node {
            client: ContentClient::new(channel),
            served,
        })
    }

    /// Stops serving; the stores are closed when this returns.
    pub async fn stop(self) -> anyhow::Result<()> {
        drop(self.client);
        self.served.stop().await
    }

    pub async fn info(&self, digest: &str) -> Result<api::Info, Status> {
        let req = api::InfoRequest {
            digest: digest.to_owned(),
        };
        let info = self
            .client
            .clone()
            .info(with_namespace!(req, "default"))
            .await?;
        Ok(info.into_inner().info.unwrap_or_default())
    }

    pub async fn read(&self, digest: &str, offset: i64, size: i64) -> Result<Vec<u8>, Status> {
        let req = api::ReadContentRequest {
            digest: digest.to_owned(),
            offset,
            size,
        };
        let mut stream = self.client.clone().read(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            assert!(chunk.data.len() <= 1 << 20, "chunks are at most 1 MiB");
            assert_eq!(chunk.offset, offset.max(0) + out.len() as i64);
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    pub async fn list(&self, filters: &[&str]) -> Result<Vec<String>, Status> {
        let req = api::ListContentRequest {
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        };
        let mut stream = self.client.clone().list(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await? {
            out.extend(batch.info.into_iter().map(|i| i.digest));
        }
        out.sort();
        Ok(out)
    }

    pub async fn update(
        &self,
        digest: &str,
        labels: Labels,
        paths: &[&str],
    ) -> Result<Labels, Status> {
        let req = api::UpdateRequest {
            info: Some(api::Info {
                digest: digest.to_owned(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
        };
        let info = self.client.clone().update(req).await?.into_inner().info;
        Ok(info.unwrap_or_default().labels)
    }

    pub async fn delete(&self, digest: &str) -> Result<(), Status> {
        let req = api::DeleteContentRequest {
            digest: digest.to_owned(),
        };
        self.client.clone().delete(req).await.map(drop)
    }

    pub async fn status(&self, r#ref: &str) -> Result<api::Status, Status> {
        let req = api::StatusRequest {
            r#ref: r#ref.to_owned(),
        };
        Ok(self
            .client
            .clone()
            .status(req)
            .await?
            .into_inner()
            .status
            .unwrap_or_default())
    }

    pub async fn statuses(&self, filters: &[&str]) -> Result<Vec<String>, Status> {
        let req = api::ListStatusesRequest {
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        };
        let statuses = self
            .client
            .clone()
            .list_statuses(req)
            .await?
            .into_inner()
            .statuses;
        Ok(statuses.into_iter().map(|s| s.r#ref).collect())
    }

    pub async fn abort(&self, r#ref: &str) -> Result<(), Status> {
        let req = api::AbortRequest {
            r#ref: r#ref.to_owned(),
        };
        self.client.clone().abort(req).await.map(drop)
    }

    /// Opens a Write stream and sends the negotiating STAT, as containerd's proxy writer does.
    pub async fn writer(
        &self,
        r#ref: &str,
        total: usize,
        expected: &str,
    ) -> Result<Session, Status> {
        let (tx, rx) = mpsc::channel(4);
        let responses = self
            .client
            .clone()
            .write(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut session = Session {
            tx,
            responses,
            offset: 0,
        };
        let first = api::WriteContentRequest {
            action: WriteAction::Stat.into(),
            r#ref: r#ref.to_owned(),
            total: total as i64,
            expected: expected.to_owned(),
            ..Default::default()
        };
        session.offset = session.send(first).await?.offset;
        Ok(session)
    }

    /// [`Node::writer`], waiting (with a deadline) for a previous writer of `ref` to let go.
    pub async fn writer_when_free(&self, r#ref: &str) -> anyhow::Result<Session> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.writer(r#ref, 0, "").await {
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return Ok(other?),
            }
        }
    }

    /// Writes and commits `data` under `ref` in 64 KiB messages; returns the committed digest.
    /// [`Node::put`] owning its arguments, so many can run at once.
    pub async fn put_owned(&self, r#ref: String, data: Vec<u8>) -> Result<String, Status> {
        self.put(&r#ref, &data, Labels::new()).await
    }

    pub async fn put(&self, r#ref: &str, data: &[u8], labels: Labels) -> Result<String, Status> {
        let mut w = self
            .writer(r#ref, data.len(), &Digest::of(data).to_string())
            .await?;
        for chunk in data.chunks(64 << 10) {
            w.write(chunk).await?;
        }
        let done = w
            .commit(data.len(), &Digest::of(data).to_string(), labels)
            .await?;
        Ok(done.digest)
    }
}

/// One Write conversation: each request gets exactly one answer.
#[derive(Debug)]
pub struct Session {
    tx: mpsc::Sender<api::WriteContentRequest>,
    responses: Streaming<api::WriteContentResponse>,
    /// Where the next write goes, as the proxy writer tracks it.
    pub offset: i64,
}

impl Session {
    pub async fn send(
        &mut self,
        req: api::WriteContentRequest,
    ) -> Result<api::WriteContentResponse, Status> {
        self.tx
            .send(req)
            .await
            .map_err(|_| Status::internal("request stream closed"))?;
        match self.responses.message().await? {
            Some(resp) => Ok(resp),
            None => Err(Status::internal("no answer")),
        }
    }

    pub async fn write_at(
        &mut self,
        offset: i64,
        data: &[u8],
    ) -> Result<api::WriteContentResponse, Status> {
        let resp = self
            .send(api::WriteContentRequest {
                action: WriteAction::Write.into(),
                offset,
                data: data.to_vec(),
                ..Default::default()
            })
            .await?;
        self.offset = resp.offset;
        Ok(resp)
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<api::WriteContentResponse, Status> {
        self.write_at(self.offset, data).await
    }

    pub async fn commit(
        &mut self,
        total: usize,
        expected: &str,
        labels: Labels,
    ) -> Result<api::WriteContentResponse, Status> {
        self.send(api::WriteContentRequest {
            action: WriteAction::Commit.into(),
            total: total as i64,
            offset: self.offset,
            expected: expected.to_owned(),
            labels,
            ..Default::default()
        })
        .await
    }
}
