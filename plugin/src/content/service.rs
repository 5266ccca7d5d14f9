//! The tonic adapter: `containerd.services.content.v1.Content` over any [`Store`]. It converts
//! messages and runs the `Write` conversation exactly as containerd's own content service
//! (`contentserver.go`) does, so containerd's proxy writer (`content_writer.go`) sees the same
//! answers; every other decision is the store's.

use std::sync::Arc;
use std::time::SystemTime;

use containerd_client::services::v1 as api;
use futures::stream::{self, BoxStream, StreamExt};
use prost_types::Timestamp;
use shoal_p2p::Digest;
use shoal_proto::content::content_server::{Content, ContentServer};
use tonic::{Request, Response, Status, Streaming};

use super::{Error, Info, READ_CHUNK, Reader, Store, Writer};
use crate::grpc;

/// Serves `store` as containerd's content service; add it to a `tonic` server.
pub fn service<S: Store>(store: S) -> ContentServer<ContentService<S>> {
    ContentServer::new(ContentService {
        store: Arc::new(store),
    })
    // containerd sends writes of up to 1 MiB plus framing; leave room for labels.
    .max_decoding_message_size(16 << 20)
}

/// The gRPC face of a [`Store`]; see [`service`].
#[derive(Debug)]
pub struct ContentService<S> {
    store: Arc<S>,
}

type Reply<T> = Result<Response<T>, Status>;

fn digest(s: &str) -> Result<Digest, Error> {
    s.parse()
        .map_err(|e: shoal_p2p::digest::DigestError| Error::InvalidArgument(e.to_string()))
}

/// An optional digest: empty means none.
fn expected(s: &str) -> Result<Option<Digest>, Error> {
    (!s.is_empty()).then(|| digest(s)).transpose()
}

fn timestamp(t: SystemTime) -> Option<Timestamp> {
    Some(t.into())
}

fn size(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn info(info: Info) -> api::Info {
    api::Info {
        digest: info.digest.to_string(),
        size: size(info.size),
        created_at: timestamp(info.created),
        updated_at: timestamp(info.updated),
        labels: info.labels,
    }
}

fn status(s: super::Status) -> api::Status {
    api::Status {
        started_at: timestamp(s.started),
        updated_at: timestamp(s.updated),
        r#ref: s.r#ref,
        offset: size(s.offset),
        total: size(s.total),
        expected: s.expected.map(|d| d.to_string()).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl<S: Store> Content for ContentService<S> {
    async fn info(&self, request: Request<api::InfoRequest>) -> Reply<api::InfoResponse> {
        let d = digest(&request.into_inner().digest)?;
        let i = self.store.info(d).await?;
        Ok(Response::new(api::InfoResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(&self, request: Request<api::UpdateRequest>) -> Reply<api::UpdateResponse> {
        let r = request.into_inner();
        let Some(i) = r.info else {
            return Err(Error::InvalidArgument("update without info".to_owned()).into());
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let updated = self
            .store
            .update(digest(&i.digest)?, i.labels, paths)
            .await?;
        Ok(Response::new(api::UpdateResponse {
            info: Some(info(updated)),
        }))
    }

    type ListStream = BoxStream<'static, Result<api::ListContentResponse, Status>>;

    async fn list(&self, request: Request<api::ListContentRequest>) -> Reply<Self::ListStream> {
        let all = self.store.list(request.into_inner().filters).await?;
        let batches = grpc::list_batches(all.into_iter().map(info), |info| {
            api::ListContentResponse { info }
        });
        Ok(Response::new(stream::iter(batches).boxed()))
    }

    async fn delete(&self, request: Request<api::DeleteContentRequest>) -> Reply<()> {
        let d = digest(&request.into_inner().digest)?;
        self.store.delete(d).await?;
        Ok(Response::new(()))
    }

    type ReadStream = BoxStream<'static, Result<api::ReadContentResponse, Status>>;

    async fn read(&self, request: Request<api::ReadContentRequest>) -> Reply<Self::ReadStream> {
        let r = request.into_inner();
        let reader = self.store.reader(digest(&r.digest)?).await?;
        let blob_size = reader.size();
        // containerd: a negative offset reads from 0; a size of 0 (or too big) reads to the end.
        let offset = u64::try_from(r.offset).unwrap_or(0);
        if offset > blob_size {
            return Err(Error::ReadOffset {
                offset: r.offset,
                size: blob_size,
            }
            .into());
        }
        let end = match u64::try_from(r.size) {
            Ok(n) if n > 0 => offset.saturating_add(n).min(blob_size),
            _ => blob_size,
        };
        let chunks = stream::unfold(Some((reader, offset)), move |state| async move {
            let (reader, offset) = state.filter(|(_, offset)| *offset < end)?;
            let len = (end - offset).min(READ_CHUNK as u64) as usize;
            match reader.read_at(offset, len).await {
                Ok(data) => {
                    let message = api::ReadContentResponse {
                        offset: size(offset),
                        data: data.into(),
                    };
                    Some((Ok(message), Some((reader, offset + len as u64))))
                }
                Err(e) => Some((Err(e.into()), None)),
            }
        });
        Ok(Response::new(chunks.boxed()))
    }

    async fn status(&self, request: Request<api::StatusRequest>) -> Reply<api::StatusResponse> {
        let s = self.store.status(request.into_inner().r#ref).await?;
        Ok(Response::new(api::StatusResponse {
            status: Some(status(s)),
        }))
    }

    async fn list_statuses(
        &self,
        request: Request<api::ListStatusesRequest>,
    ) -> Reply<api::ListStatusesResponse> {
        let all = self
            .store
            .list_statuses(request.into_inner().filters)
            .await?;
        Ok(Response::new(api::ListStatusesResponse {
            statuses: all.into_iter().map(status).collect(),
        }))
    }

    type WriteStream = BoxStream<'static, Result<api::WriteContentResponse, Status>>;

    async fn write(
        &self,
        request: Request<Streaming<api::WriteContentRequest>>,
    ) -> Reply<Self::WriteStream> {
        let session = Session {
            store: self.store.clone(),
            requests: request.into_inner(),
            writer: None,
            r#ref: String::new(),
            total: 0,
            expected: None,
        };
        // One answer per request; the first error or a commit ends the conversation, and
        // dropping the session (client gone) releases the ref for the next writer.
        let answers = stream::unfold(Some(session), |session| async move {
            let mut session = session?;
            match session.next().await {
                Ok(None) => None,
                Ok(Some((answer, more))) => Some((Ok(answer), more.then_some(session))),
                Err(e) => Some((Err(e.into()), None)),
            }
        });
        Ok(Response::new(answers.boxed()))
    }

    async fn abort(&self, request: Request<api::AbortRequest>) -> Reply<()> {
        self.store.abort(request.into_inner().r#ref).await?;
        Ok(Response::new(()))
    }
}

/// One `Write` conversation: the first request names the ref (and maybe the size and digest
/// to come) and locks it; each request then gets one answer.
struct Session<S: Store> {
    store: Arc<S>,
    requests: Streaming<api::WriteContentRequest>,
    writer: Option<S::Writer>,
    r#ref: String,
    total: u64,
    expected: Option<Digest>,
}

impl<S: Store> Session<S> {
    /// Handles the next request: `None` when the client has finished, else the answer and
    /// whether the conversation goes on.
    async fn next(&mut self) -> Result<Option<(api::WriteContentResponse, bool)>, Error> {
        let Ok(Some(req)) = self.requests.message().await else {
            // End of stream, or the client went away: the ingest stays for a later writer.
            return Ok(None);
        };
        let mut writer = match self.writer.take() {
            Some(w) => w,
            None => {
                if req.r#ref.is_empty() {
                    return Err(Error::InvalidArgument(
                        "first message must have a reference".to_owned(),
                    ));
                }
                self.r#ref = req.r#ref.clone();
                self.total = u64::try_from(req.total).unwrap_or(0);
                self.expected = expected(&req.expected)?;
                let r = self.r#ref.clone();
                self.store.writer(r, self.total, self.expected).await?
            }
        };
        let current = writer.status().offset;
        if let Some(dg) = expected(&req.expected)? {
            self.expected = Some(dg);
            if self.store.exists(dg).await? {
                // As containerd: someone else got the blob in; this ingest is pointless.
                drop(writer);
                if let Err(e) = self.store.abort(self.r#ref.clone()).await {
                    tracing::debug!(r#ref = %self.r#ref, error = %e, "aborting ingest");
                }
                return Err(Error::AlreadyExists(dg));
            }
        }
        if req.total > 0 {
            self.total = req.total as u64;
        }
        let action = api::WriteAction::try_from(req.action)
            .map_err(|_| Error::InvalidArgument(format!("unknown write action {}", req.action)))?;
        let mut digest = writer.digest();
        match action {
            api::WriteAction::Stat => {}
            api::WriteAction::Write | api::WriteAction::Commit => {
                if req.offset < 0 || (req.offset > 0 && req.offset as u64 != current) {
                    return Err(Error::WriteOffset {
                        requested: req.offset,
                        current,
                    });
                }
                if req.offset == 0 && current > 0 {
                    writer.truncate().await?;
                }
                if !req.data.is_empty() {
                    writer.write(req.data.into()).await?;
                }
                digest = writer.digest();
                if action == api::WriteAction::Commit {
                    let status = writer.status();
                    digest = writer.commit(self.total, self.expected, req.labels).await?;
                    let answer = answer(action, &status, self.total, digest);
                    return Ok(Some((answer, false)));
                }
            }
        }
        let answer = answer(action, &writer.status(), self.total, digest);
        self.writer = Some(writer);
        Ok(Some((answer, true)))
    }
}

fn answer(
    action: api::WriteAction,
    s: &super::Status,
    total: u64,
    digest: Digest,
) -> api::WriteContentResponse {
    api::WriteContentResponse {
        action: action.into(),
        started_at: timestamp(s.started),
        updated_at: timestamp(s.updated),
        offset: size(s.offset),
        total: size(total),
        digest: digest.to_string(),
    }
}
