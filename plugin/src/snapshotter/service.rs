//! The tonic adapter: `containerd.services.snapshots.v1.Snapshots` over any [`Snapshotter`].
//! It only converts messages; every decision is the snapshotter's. The `snapshotter` field of
//! requests is ignored: containerd fills it with the proxy plugin's name from its own config.

use std::sync::Arc;

use containerd_client::services::v1::snapshots as api;
use containerd_client::types::Mount as ApiMount;
use futures::stream;
use shoal_proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use tonic::{Request, Response, Status};

use super::{Error, Info, Kind, Mount, Snapshotter};
use crate::grpc;

/// Serves `snapshotter` as containerd's snapshots service; add it to a `tonic` server.
pub fn service<S: Snapshotter>(snapshotter: S) -> SnapshotsServer<SnapshotsService<S>> {
    SnapshotsServer::new(SnapshotsService {
        snapshotter: Arc::new(snapshotter),
    })
}

/// The gRPC face of a [`Snapshotter`]; see [`service`].
#[derive(Debug)]
pub struct SnapshotsService<S> {
    snapshotter: Arc<S>,
}

type Reply<T> = Result<Response<T>, Status>;

fn mounts(mounts: Vec<Mount>) -> Vec<ApiMount> {
    mounts
        .into_iter()
        .map(|m| ApiMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn info(info: Info) -> api::Info {
    let kind = match info.kind {
        Kind::View => api::Kind::View,
        Kind::Active => api::Kind::Active,
        Kind::Committed => api::Kind::Committed,
    };
    api::Info {
        name: info.name,
        parent: info.parent,
        kind: kind.into(),
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: info.labels,
    }
}

#[tonic::async_trait]
impl<S: Snapshotter> Snapshots for SnapshotsService<S> {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Reply<api::PrepareSnapshotResponse> {
        let r = request.into_inner();
        let m = self.snapshotter.prepare(r.key, r.parent, r.labels).await?;
        Ok(Response::new(api::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Reply<api::ViewSnapshotResponse> {
        let r = request.into_inner();
        let m = self.snapshotter.view(r.key, r.parent, r.labels).await?;
        Ok(Response::new(api::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(&self, request: Request<api::MountsRequest>) -> Reply<api::MountsResponse> {
        let m = self.snapshotter.mounts(request.into_inner().key).await?;
        Ok(Response::new(api::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(&self, request: Request<api::CommitSnapshotRequest>) -> Reply<()> {
        let r = request.into_inner();
        self.snapshotter.commit(r.name, r.key, r.labels).await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, request: Request<api::RemoveSnapshotRequest>) -> Reply<()> {
        self.snapshotter.remove(request.into_inner().key).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Reply<api::StatSnapshotResponse> {
        let i = self.snapshotter.stat(request.into_inner().key).await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Reply<api::UpdateSnapshotResponse> {
        let r = request.into_inner();
        let Some(i) = r.info else {
            return Err(Error::InvalidArgument("update without info".to_owned()).into());
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let updated = self.snapshotter.update(i.name, i.labels, paths).await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info(updated)),
        }))
    }

    type ListStream = stream::Iter<std::vec::IntoIter<Result<api::ListSnapshotsResponse, Status>>>;

    async fn list(&self, request: Request<api::ListSnapshotsRequest>) -> Reply<Self::ListStream> {
        let all = self.snapshotter.list(request.into_inner().filters).await?;
        let batches = grpc::list_batches(all.into_iter().map(info), |info| {
            api::ListSnapshotsResponse { info }
        });
        Ok(Response::new(stream::iter(batches)))
    }

    async fn usage(&self, request: Request<api::UsageRequest>) -> Reply<api::UsageResponse> {
        let u = self.snapshotter.usage(request.into_inner().key).await?;
        Ok(Response::new(api::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _: Request<api::CleanupRequest>) -> Reply<()> {
        self.snapshotter.cleanup().await?;
        Ok(Response::new(()))
    }
}
