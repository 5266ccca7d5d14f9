//! What the snapshotter's and the content store's gRPC tests share: serving a service
//! in-process on a Unix socket in a tempdir, as `shoal node` serves it to containerd, and a few
//! helpers for building requests and checking answers.

// Each test target uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::Path;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub type Labels = HashMap<String, String>;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The code of a call that must fail.
pub fn code<T: Debug>(result: Result<T, Status>) -> anyhow::Result<Code> {
    match result {
        Ok(v) => anyhow::bail!("expected an error, got {v:?}"),
        Err(status) => Ok(status.code()),
    }
}

/// Deterministic bytes that do not repeat within a blob.
pub fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A gRPC server running in-process; see [`serve`].
#[derive(Debug)]
pub struct Served {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Serves `routes` on `socket` and connects a channel to it.
pub async fn serve(socket: &Path, routes: Routes) -> anyhow::Result<(Served, Channel)> {
    if socket.exists() {
        std::fs::remove_file(socket)?;
    }
    // Bound before the client connects, so no readiness wait is needed.
    let listener = UnixListener::bind(socket)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                stopped.await.ok();
            }),
    );
    let channel = containerd_client::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    Ok((Served { stop, task }, channel))
}

impl Served {
    /// Stops serving: drop the clients first, the server waits for their connections. What the
    /// service held is closed when this returns.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.send(()).ok();
        self.task.await??;
        Ok(())
    }
}
