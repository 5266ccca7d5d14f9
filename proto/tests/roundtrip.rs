//! Proves the generated servers are wire compatible with containerd-client: minimal Snapshots and
//! Content servers built on `shoal_proto` are served over a Unix socket in a tempdir and called
//! with containerd-client's own generated clients, the way containerd calls a proxy plugin.

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::{
    self as snap, Kind, snapshots_client::SnapshotsClient,
};
use containerd_client::services::v1::{self as content, content_client::ContentClient};
use containerd_client::with_namespace;
use prost_types::Timestamp;
use shoal_proto::content::content_server::{Content, ContentServer};
use shoal_proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status};

type Reply<T> = Result<Response<T>, Status>;
type EmptyStream<T> = tokio_stream::Empty<Result<T, Status>>;

const CREATED_AT: Timestamp = Timestamp {
    seconds: 1_700_000_000,
    nanos: 123,
};

fn unimplemented<T>() -> Reply<T> {
    Err(Status::unimplemented("not part of this test"))
}

fn labels() -> HashMap<String, String> {
    HashMap::from([(
        "containerd.io/snapshot.ref".to_owned(),
        "sha256:abc".to_owned(),
    )])
}

/// `stat` answers any key of the `shoal` snapshotter with a committed snapshot and NotFound for
/// other snapshotters; everything else is Unimplemented.
#[derive(Debug)]
struct FixedSnapshots;

#[tonic::async_trait]
impl Snapshots for FixedSnapshots {
    async fn stat(
        &self,
        request: Request<snap::StatSnapshotRequest>,
    ) -> Reply<snap::StatSnapshotResponse> {
        let request = request.into_inner();
        if request.snapshotter != "shoal" {
            return Err(Status::not_found(format!(
                "snapshotter {}",
                request.snapshotter
            )));
        }
        Ok(Response::new(snap::StatSnapshotResponse {
            info: Some(snap::Info {
                name: request.key,
                parent: "sha256:parent".to_owned(),
                kind: Kind::Committed.into(),
                created_at: Some(CREATED_AT),
                updated_at: Some(CREATED_AT),
                labels: labels(),
            }),
        }))
    }

    async fn prepare(
        &self,
        _: Request<snap::PrepareSnapshotRequest>,
    ) -> Reply<snap::PrepareSnapshotResponse> {
        unimplemented()
    }
    async fn view(
        &self,
        _: Request<snap::ViewSnapshotRequest>,
    ) -> Reply<snap::ViewSnapshotResponse> {
        unimplemented()
    }
    async fn mounts(&self, _: Request<snap::MountsRequest>) -> Reply<snap::MountsResponse> {
        unimplemented()
    }
    async fn commit(&self, _: Request<snap::CommitSnapshotRequest>) -> Reply<()> {
        unimplemented()
    }
    async fn remove(&self, _: Request<snap::RemoveSnapshotRequest>) -> Reply<()> {
        unimplemented()
    }
    async fn update(
        &self,
        _: Request<snap::UpdateSnapshotRequest>,
    ) -> Reply<snap::UpdateSnapshotResponse> {
        unimplemented()
    }
    type ListStream = EmptyStream<snap::ListSnapshotsResponse>;
    async fn list(&self, _: Request<snap::ListSnapshotsRequest>) -> Reply<Self::ListStream> {
        unimplemented()
    }
    async fn usage(&self, _: Request<snap::UsageRequest>) -> Reply<snap::UsageResponse> {
        unimplemented()
    }
    async fn cleanup(&self, _: Request<snap::CleanupRequest>) -> Reply<()> {
        unimplemented()
    }
}

/// `info` answers every digest with a 4 KiB blob; everything else is Unimplemented.
#[derive(Debug)]
struct FixedContent;

#[tonic::async_trait]
impl Content for FixedContent {
    async fn info(&self, request: Request<content::InfoRequest>) -> Reply<content::InfoResponse> {
        Ok(Response::new(content::InfoResponse {
            info: Some(content::Info {
                digest: request.into_inner().digest,
                size: 4096,
                created_at: Some(CREATED_AT),
                updated_at: None,
                labels: labels(),
            }),
        }))
    }

    async fn update(&self, _: Request<content::UpdateRequest>) -> Reply<content::UpdateResponse> {
        unimplemented()
    }
    type ListStream = EmptyStream<content::ListContentResponse>;
    async fn list(&self, _: Request<content::ListContentRequest>) -> Reply<Self::ListStream> {
        unimplemented()
    }
    async fn delete(&self, _: Request<content::DeleteContentRequest>) -> Reply<()> {
        unimplemented()
    }
    type ReadStream = EmptyStream<content::ReadContentResponse>;
    async fn read(&self, _: Request<content::ReadContentRequest>) -> Reply<Self::ReadStream> {
        unimplemented()
    }
    async fn status(&self, _: Request<content::StatusRequest>) -> Reply<content::StatusResponse> {
        unimplemented()
    }
    async fn list_statuses(
        &self,
        _: Request<content::ListStatusesRequest>,
    ) -> Reply<content::ListStatusesResponse> {
        unimplemented()
    }
    type WriteStream = EmptyStream<content::WriteContentResponse>;
    async fn write(
        &self,
        _: Request<tonic::Streaming<content::WriteContentRequest>>,
    ) -> Reply<Self::WriteStream> {
        unimplemented()
    }
    async fn abort(&self, _: Request<content::AbortRequest>) -> Reply<()> {
        unimplemented()
    }
}

#[tokio::test]
async fn containerd_client_talks_to_generated_servers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("shoal.sock");
    // Bound before the client connects, so no readiness wait is needed.
    let listener = UnixListener::bind(&socket)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(SnapshotsServer::new(FixedSnapshots))
            .add_service(ContentServer::new(FixedContent))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                stopped.await.ok();
            }),
    );

    let channel = containerd_client::connect(&socket).await?;
    let mut snapshots = SnapshotsClient::new(channel.clone());
    let mut content = ContentClient::new(channel);

    let stat = snapshots
        .stat(with_namespace!(
            snap::StatSnapshotRequest {
                snapshotter: "shoal".to_owned(),
                key: "layer-1".to_owned(),
            },
            "default"
        ))
        .await?
        .into_inner();
    let expected = snap::Info {
        name: "layer-1".to_owned(),
        parent: "sha256:parent".to_owned(),
        kind: Kind::Committed.into(),
        created_at: Some(CREATED_AT),
        updated_at: Some(CREATED_AT),
        labels: labels(),
    };
    assert_eq!(stat.info, Some(expected));

    let wrong_snapshotter = snap::StatSnapshotRequest {
        snapshotter: "overlayfs".to_owned(),
        key: "layer-1".to_owned(),
    };
    let status = snapshots
        .stat(wrong_snapshotter)
        .await
        .expect_err("stat must fail for another snapshotter");
    assert_eq!(status.code(), Code::NotFound);

    let status = snapshots
        .usage(snap::UsageRequest::default())
        .await
        .expect_err("usage is not implemented by the test server");
    assert_eq!(status.code(), Code::Unimplemented);

    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let info = content
        .info(with_namespace!(
            content::InfoRequest {
                digest: digest.to_owned(),
            },
            "default"
        ))
        .await?
        .into_inner();
    let expected = content::Info {
        digest: digest.to_owned(),
        size: 4096,
        created_at: Some(CREATED_AT),
        updated_at: None,
        labels: labels(),
    };
    assert_eq!(info.info, Some(expected));

    drop((snapshots, content));
    stop.send(()).ok();
    server.await??;
    Ok(())
}
