//! Starts the snapshotter in-process on a Unix socket in a tempdir, as `shoal node` serves it to
//! containerd, and talks to it with containerd-client's real `SnapshotsClient`.

use std::path::{Path, PathBuf};

use containerd_client::services::v1::snapshots::{self as api, snapshots_client::SnapshotsClient};
use containerd_client::types::Mount;
use containerd_client::with_namespace;
use shoal_plugin::snapshotter::{OverlaySnapshotter, service};
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Request, Status};

pub use crate::common::{Labels, code, labels};
use crate::common::{Served, serve};

/// containerd sends the proxy plugin's name; the snapshotter ignores it.
const SNAPSHOTTER: &str = "shoal";
const NAMESPACE: &str = "default";

/// A running snapshotter service.
pub struct Server {
    pub root: PathBuf,
    served: Served,
}

impl Server {
    /// Serves the snapshotter rooted at `dir/root` on `dir/shoal.sock` and connects a client.
    pub async fn start(dir: &Path) -> anyhow::Result<(Server, Client)> {
        let root = dir.join("root");
        let snapshotter = OverlaySnapshotter::open(&root)?;
        let socket = dir.join("shoal.sock");
        let (served, channel) = serve(&socket, Routes::new(service(snapshotter))).await?;
        let client = Client {
            inner: SnapshotsClient::new(channel),
        };
        Ok((Server { root, served }, client))
    }

    /// Stops serving; the snapshotter (and its database) is closed when this returns.
    pub async fn stop(self, client: Client) -> anyhow::Result<()> {
        drop(client);
        self.served.stop().await
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// `<root>/snapshots/<id>/fs` as a mount option would spell it.
    pub fn fs(&self, id: u64) -> String {
        self.dir(id).join("fs").display().to_string()
    }

    pub fn work(&self, id: u64) -> String {
        self.dir(id).join("work").display().to_string()
    }
}

/// What containerd's overlay snapshotter appends to every overlay mount on this kernel.
pub fn overlay_extra_options() -> Vec<String> {
    if Path::new("/sys/module/overlay/parameters/index").exists() {
        vec!["index=off".to_owned()]
    } else {
        Vec::new()
    }
}

pub fn bind(source: String, mode: &str) -> Mount {
    Mount {
        r#type: "bind".to_owned(),
        source,
        target: String::new(),
        options: vec![mode.to_owned(), "rbind".to_owned()],
    }
}

pub fn overlay(options: Vec<String>) -> Mount {
    let mut options = options;
    options.extend(overlay_extra_options());
    Mount {
        r#type: "overlay".to_owned(),
        source: "overlay".to_owned(),
        target: String::new(),
        options,
    }
}

/// containerd-client's `SnapshotsClient`, called the way containerd's proxy calls it.
pub struct Client {
    pub inner: SnapshotsClient<Channel>,
}

impl Client {
    pub async fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status> {
        let req = api::PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels,
        };
        Ok(self
            .inner
            .prepare(with_namespace!(req, NAMESPACE))
            .await?
            .into_inner()
            .mounts)
    }

    pub async fn view(
        &mut self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status> {
        let req = api::ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels,
        };
        Ok(self
            .inner
            .view(with_namespace!(req, NAMESPACE))
            .await?
            .into_inner()
            .mounts)
    }

    pub async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, Status> {
        let req = api::MountsRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        };
        Ok(self
            .inner
            .mounts(with_namespace!(req, NAMESPACE))
            .await?
            .into_inner()
            .mounts)
    }

    pub async fn commit(&mut self, name: &str, key: &str, labels: Labels) -> Result<(), Status> {
        let req = api::CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            name: name.to_owned(),
            key: key.to_owned(),
            labels,
        };
        self.inner.commit(with_namespace!(req, NAMESPACE)).await?;
        Ok(())
    }

    /// Prepare `key` on `parent` and commit it as `name` right away.
    pub async fn layer(&mut self, name: &str, parent: &str) -> Result<(), Status> {
        let key = format!("{name}-active");
        self.prepare(&key, parent, Labels::new()).await?;
        self.commit(name, &key, Labels::new()).await
    }

    pub async fn remove(&mut self, key: &str) -> Result<(), Status> {
        let req = api::RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        };
        self.inner.remove(with_namespace!(req, NAMESPACE)).await?;
        Ok(())
    }

    pub async fn stat(&mut self, key: &str) -> Result<api::Info, Status> {
        let req = api::StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        };
        let info = self
            .inner
            .stat(with_namespace!(req, NAMESPACE))
            .await?
            .into_inner()
            .info;
        info.ok_or_else(|| Status::internal("stat without info"))
    }

    pub async fn update(
        &mut self,
        info: Option<api::Info>,
        paths: &[&str],
    ) -> Result<api::Info, Status> {
        let req = api::UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            info,
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
        };
        let info = self
            .inner
            .update(with_namespace!(req, NAMESPACE))
            .await?
            .into_inner()
            .info;
        info.ok_or_else(|| Status::internal("update without info"))
    }

    /// The responses of one `List`, in order.
    pub async fn list_batches(&mut self, filters: &[&str]) -> Result<Vec<Vec<api::Info>>, Status> {
        let req = api::ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        };
        let mut stream = self
            .inner
            .list(with_namespace!(req, NAMESPACE))
            .await?
            .into_inner();
        let mut batches = Vec::new();
        while let Some(batch) = stream.message().await? {
            batches.push(batch.info);
        }
        Ok(batches)
    }

    /// Sorted names of the snapshots `List` returns.
    pub async fn list(&mut self, filters: &[&str]) -> Result<Vec<String>, Status> {
        let mut names: Vec<String> = self
            .list_batches(filters)
            .await?
            .into_iter()
            .flatten()
            .map(|i| i.name)
            .collect();
        names.sort();
        Ok(names)
    }

    pub async fn usage(&mut self, key: &str) -> Result<api::UsageResponse, Status> {
        let req = api::UsageRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.to_owned(),
        };
        Ok(self
            .inner
            .usage(with_namespace!(req, NAMESPACE))
            .await?
            .into_inner())
    }

    pub async fn cleanup(&mut self) -> Result<(), Status> {
        let req = api::CleanupRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
        };
        self.inner.cleanup(with_namespace!(req, NAMESPACE)).await?;
        Ok(())
    }
}
