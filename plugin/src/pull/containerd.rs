//! The slice of containerd's API `shoal pull` needs, over its own gRPC socket: content
//! (write and label blobs), snapshots (prepare, commit, stat), diff (apply a layer), images
//! (create the record) and leases (keep it all from the garbage collector mid-pull).
//!
//! Every request carries the namespace and, once taken, the lease, as containerd's Go client
//! does with `namespaces.WithNamespace` and `leases.WithLease`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, Image, InfoRequest, UpdateImageRequest, WriteAction,
    WriteContentRequest, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, leases_client::LeasesClient,
};
use containerd_client::types::{Descriptor, Mount};
use futures::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::Error;

/// Bytes per `Write` message, well under gRPC's default 4 MiB message limit.
const WRITE_CHUNK: usize = 1 << 20;

/// A containerd connection bound to one namespace and snapshotter.
#[derive(Clone, Debug)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    pub snapshotter: String,
    lease: Option<String>,
}

/// How a `Prepare` for an unpack went.
#[derive(Debug)]
pub enum Prepared {
    /// The snapshotter made the snapshot itself (a lazy layer).
    Exists,
    /// An empty active snapshot to unpack into.
    Mounts(Vec<Mount>),
}

impl Containerd {
    pub async fn connect(socket: &Path, namespace: &str, snapshotter: &str) -> Result<Self, Error> {
        let channel =
            containerd_client::connect(socket)
                .await
                .map_err(|source| Error::Connect {
                    socket: socket.to_owned(),
                    source,
                })?;
        Ok(Self {
            channel,
            namespace: namespace.to_owned(),
            snapshotter: snapshotter.to_owned(),
            lease: None,
        })
    }

    fn request<T>(&self, message: T) -> Result<Request<T>, Error> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        let value = |v: &str| {
            v.parse()
                .map_err(|_| Error::Invalid(format!("{v:?} cannot be sent as gRPC metadata")))
        };
        metadata.insert("containerd-namespace", value(&self.namespace)?);
        if let Some(lease) = &self.lease {
            metadata.insert("containerd-lease", value(lease)?);
        }
        Ok(request)
    }

    /// Takes a lease that expires by itself, so a pull that dies leaves nothing pinned.
    pub async fn lease(&mut self, expire: Duration) -> Result<(), Error> {
        use containerd_client::services::v1::CreateRequest;
        let expire_at = humantime_rfc3339(SystemTime::now() + expire);
        let id = format!(
            "shoal-pull-{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let request = self.request(CreateRequest {
            id,
            labels: HashMap::from([("containerd.io/gc.expire".to_owned(), expire_at)]),
        })?;
        let lease = LeasesClient::new(self.channel.clone())
            .create(request)
            .await
            .map_err(rpc("creating a lease"))?
            .into_inner()
            .lease
            .ok_or_else(|| Error::Invalid("containerd returned no lease".into()))?;
        self.lease = Some(lease.id);
        Ok(())
    }

    /// Lets go of the lease (the image record and gc labels now hold everything).
    pub async fn release(&mut self) -> Result<(), Error> {
        use containerd_client::services::v1::DeleteRequest;
        if let Some(id) = self.lease.take() {
            let request = self.request(DeleteRequest { id, sync: false })?;
            LeasesClient::new(self.channel.clone())
                .delete(request)
                .await
                .map_err(rpc("deleting the lease"))?;
        }
        Ok(())
    }

    /// Whether the content store has `digest` (or, with remote content, can get it).
    pub async fn has_content(&self, digest: &str) -> Result<bool, Error> {
        let request = self.request(InfoRequest {
            digest: digest.to_owned(),
        })?;
        match ContentClient::new(self.channel.clone()).info(request).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(rpc("asking the content store")(s)),
        }
    }

    /// Writes a blob into the content store from a stream of chunks, committed with its
    /// expected digest and size (containerd checks both) and `labels`.
    pub async fn write_content<S>(
        &self,
        digest: &str,
        size: u64,
        labels: HashMap<String, String>,
        data: S,
    ) -> Result<(), Error>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, Error>> + Send + 'static,
    {
        let reference = format!("shoal-pull-{digest}");
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let request = self.request(tokio_stream::wrappers::ReceiverStream::new(rx))?;
        let mut client = ContentClient::new(self.channel.clone());
        let call = tokio::spawn(async move { client.write(request).await });
        let send = async {
            // Start over: a previous pull may have left part of this ingest behind.
            let mut offset = 0u64;
            let mut data = std::pin::pin!(data);
            while let Some(chunk) = data.next().await {
                let chunk = chunk?;
                for piece in chunk.chunks(WRITE_CHUNK) {
                    let message = WriteContentRequest {
                        action: WriteAction::Write.into(),
                        r#ref: reference.clone(),
                        total: size as i64,
                        expected: digest.to_owned(),
                        offset: offset as i64,
                        data: piece.to_vec(),
                        labels: HashMap::new(),
                    };
                    offset += piece.len() as u64;
                    if tx.send(message).await.is_err() {
                        return Ok(());
                    }
                }
            }
            let commit = WriteContentRequest {
                action: WriteAction::Commit.into(),
                r#ref: reference.clone(),
                total: size as i64,
                expected: digest.to_owned(),
                offset: offset as i64,
                data: Vec::new(),
                labels,
            };
            let _ = tx.send(commit).await;
            Ok::<_, Error>(())
        };
        let sent = send.await;
        drop(tx);
        let response = call
            .await
            .map_err(|e| Error::Invalid(format!("content write task: {e}")))?;
        match response {
            Ok(response) => {
                let mut replies = response.into_inner();
                while let Some(reply) = replies.next().await {
                    match reply {
                        Ok(_) => {}
                        Err(s) if s.code() == Code::AlreadyExists => break,
                        Err(s) => return Err(rpc("writing content")(s)),
                    }
                }
            }
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(rpc("writing content")(s)),
        }
        sent
    }

    /// Sets `labels` on a blob, leaving its other labels alone.
    pub async fn label_content(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        use containerd_client::services::v1::{Info, UpdateRequest};
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let request = self.request(UpdateRequest {
            info: Some(Info {
                digest: digest.to_owned(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        })?;
        ContentClient::new(self.channel.clone())
            .update(request)
            .await
            .map_err(rpc("labelling content"))?;
        Ok(())
    }

    pub async fn stat_snapshot(&self, key: &str) -> Result<bool, Error> {
        let request = self.request(StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
        })?;
        match SnapshotsClient::new(self.channel.clone())
            .stat(request)
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(rpc("stating a snapshot")(s)),
        }
    }

    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Prepared, Error> {
        let request = self.request(PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels,
        })?;
        match SnapshotsClient::new(self.channel.clone())
            .prepare(request)
            .await
        {
            Ok(response) => Ok(Prepared::Mounts(response.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => Ok(Prepared::Exists),
            Err(s) => Err(rpc("preparing a snapshot")(s)),
        }
    }

    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        let request = self.request(CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: name.to_owned(),
            key: key.to_owned(),
            labels,
        })?;
        SnapshotsClient::new(self.channel.clone())
            .commit(request)
            .await
            .map_err(rpc("committing a snapshot"))?;
        Ok(())
    }

    pub async fn remove_snapshot(&self, key: &str) -> Result<(), Error> {
        let request = self.request(RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_owned(),
        })?;
        SnapshotsClient::new(self.channel.clone())
            .remove(request)
            .await
            .map_err(rpc("removing a snapshot"))?;
        Ok(())
    }

    /// Unpacks the layer `diff` (already in the content store) onto `mounts`; returns the
    /// digest of what was applied (the diff id).
    pub async fn apply(&self, diff: Descriptor, mounts: Vec<Mount>) -> Result<String, Error> {
        let request = self.request(ApplyRequest {
            diff: Some(diff),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        })?;
        let applied = DiffClient::new(self.channel.clone())
            .apply(request)
            .await
            .map_err(rpc("applying a layer"))?
            .into_inner()
            .applied
            .ok_or_else(|| Error::Invalid("containerd applied no layer".into()))?;
        Ok(applied.digest)
    }

    /// Creates the image record `name` → `target`, or points an existing one at it.
    pub async fn set_image(&self, name: &str, target: Descriptor) -> Result<(), Error> {
        let now = SystemTime::now();
        let image = Image {
            name: name.to_owned(),
            labels: HashMap::new(),
            target: Some(target),
            created_at: Some(now.into()),
            updated_at: Some(now.into()),
        };
        let request = self.request(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        })?;
        let mut images = ImagesClient::new(self.channel.clone());
        match images.create(request).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                let request = self.request(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".to_owned()],
                    }),
                    source_date_epoch: None,
                })?;
                images
                    .update(request)
                    .await
                    .map_err(rpc("updating the image"))?;
                Ok(())
            }
            Err(s) => Err(rpc("creating the image")(s)),
        }
    }
}

fn rpc(what: &'static str) -> impl FnOnce(Status) -> Error {
    move |status| Error::Containerd { what, status }
}

/// RFC 3339 in UTC, as containerd's `gc.expire` label wants it.
fn humantime_rfc3339(at: SystemTime) -> String {
    prost_types::Timestamp::from(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_in_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_306_611);
        assert_eq!(humantime_rfc3339(at), "2026-11-22T00:16:51Z");
        let leap_day = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(humantime_rfc3339(leap_day), "2000-02-29T00:00:00Z");
        assert_eq!(
            humantime_rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00Z"
        );
    }
}
