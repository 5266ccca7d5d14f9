//! One peer connection for one blob: the handshake, a reader that forwards what the peer says
//! to the torrent, and a writer that sends our messages and serves the peer's requests.
//!
//! Uploads are queued per connection (bounded) and served one piece at a time through the
//! node's egress limiter, so a connection holds at most one piece in memory for uploads. A
//! request for a piece we lack, or one that other peers can serve while our queue is busy, is
//! answered with `Reject` so the asker goes elsewhere: the first copies of a piece spread to
//! different peers instead of all coming from whoever had it first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::SwarmCtx;
use super::torrent::Event;
use crate::store::Blob;
use crate::wire::{Codec, Hello, Message, PeerId, WireError};

pub(super) type Transport = Framed<TcpStream, Codec>;

/// Pieces a peer may have queued with us at once; more is a protocol violation.
const MAX_QUEUED: usize = 16;
/// Above this many queued uploads we turn away requests other peers can serve.
const BUSY_QUEUE: usize = 2;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection to `addr` and exchanges hellos.
pub(super) async fn dial(addr: &str, hello: Hello) -> Result<(Transport, Hello), WireError> {
    let stream = tokio::time::timeout(HELLO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    let mut framed = Framed::new(stream, Codec);
    framed.send(Message::Hello(hello)).await?;
    let theirs = read_hello(&mut framed).await?;
    Ok((framed, theirs))
}

/// Reads the first frame of a connection, which must be a hello.
pub(super) async fn read_hello(framed: &mut Transport) -> Result<Hello, WireError> {
    match tokio::time::timeout(HELLO_TIMEOUT, framed.next()).await {
        Err(_) => Err(WireError::BadHello("no hello within 10 s".into())),
        Ok(None) => Err(WireError::BadHello("closed before hello".into())),
        Ok(Some(Ok(Message::Hello(h)))) => Ok(h),
        Ok(Some(Ok(other))) => Err(WireError::BadHello(format!(
            "expected hello, got {}",
            kind(&other)
        ))),
        Ok(Some(Err(e))) => Err(e),
    }
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Bitfield(_) => "bitfield",
        Message::Have(_) => "have",
        Message::Request(_) => "request",
        Message::Piece { .. } => "piece",
        Message::Cancel(_) => "cancel",
        Message::Reject(_) => "reject",
        Message::Goodbye(_) => "goodbye",
    }
}

/// Shared between a connection's reader and writer.
#[derive(Debug, Default)]
struct Uploads {
    queue: Mutex<VecDeque<u32>>,
    ready: Notify,
}

/// Everything a running connection needs.
pub(super) struct Conn {
    pub id: u64,
    pub peer_id: PeerId,
    pub blob: Blob,
    pub events: mpsc::Sender<Event>,
    pub outbox: mpsc::Receiver<Message>,
    /// Our own sender, for replies (rejects) from the reader.
    pub reply: mpsc::Sender<Message>,
    /// How many of the torrent's peers have each piece.
    pub avail: Arc<Vec<AtomicU16>>,
    pub ctx: Arc<SwarmCtx>,
    pub cancel: CancellationToken,
}

impl Conn {
    /// Runs until the peer hangs up, breaks the protocol, or the torrent drops us.
    pub(super) async fn run(self, framed: Transport) {
        let (sink, stream) = framed.split();
        let uploads = Arc::new(Uploads::default());
        let writer = tokio::spawn(write_loop(
            sink,
            self.outbox,
            uploads.clone(),
            self.blob.clone(),
            self.ctx.clone(),
            self.cancel.clone(),
        ));
        let reason = tokio::select! {
            r = read_loop(stream, &self.events, self.id, &self.reply, &uploads, &self.blob, &self.avail, &self.ctx) => r,
            () = self.cancel.cancelled() => "closed by us".to_owned(),
        };
        self.cancel.cancel();
        let _ = writer.await;
        debug!(peer = ?self.peer_id, digest = ?self.blob.digest(), %reason, "connection closed");
        let _ = self
            .events
            .send(Event::Gone {
                conn: self.id,
                reason,
            })
            .await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    mut stream: futures::stream::SplitStream<Transport>,
    events: &mpsc::Sender<Event>,
    conn: u64,
    reply: &mpsc::Sender<Message>,
    uploads: &Uploads,
    blob: &Blob,
    avail: &[AtomicU16],
    ctx: &SwarmCtx,
) -> String {
    loop {
        let msg = match stream.next().await {
            None => return "peer closed the connection".into(),
            Some(Err(e)) => return format!("protocol error: {e}"),
            Some(Ok(m)) => m,
        };
        let event = match msg {
            Message::Request(index) => {
                let queued = uploads
                    .queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .len();
                if queued >= MAX_QUEUED {
                    return format!("peer queued more than {MAX_QUEUED} requests");
                }
                let elsewhere = avail
                    .get(index as usize)
                    .is_some_and(|a| a.load(Ordering::Relaxed) > 0);
                if !blob.has_piece(index) || (queued >= BUSY_QUEUE && elsewhere) {
                    if reply.send(Message::Reject(index)).await.is_err() {
                        return "writer gone".into();
                    }
                } else {
                    uploads
                        .queue
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_back(index);
                    uploads.ready.notify_one();
                }
                continue;
            }
            Message::Cancel(index) => {
                uploads
                    .queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|&i| i != index);
                continue;
            }
            Message::Piece { index, data } => {
                ctx.ingress.acquire(data.len()).await;
                Event::Piece { conn, index, data }
            }
            Message::Bitfield(bits) => Event::Bitfield { conn, bits },
            Message::Have(index) => Event::Have { conn, index },
            Message::Reject(index) => Event::Reject { conn, index },
            Message::Goodbye(reason) => return format!("peer said goodbye: {reason}"),
            Message::Hello(_) => return "second hello".into(),
        };
        if events.send(event).await.is_err() {
            return "torrent gone".into();
        }
    }
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<Transport, Message>,
    mut outbox: mpsc::Receiver<Message>,
    uploads: Arc<Uploads>,
    blob: Blob,
    ctx: Arc<SwarmCtx>,
    cancel: CancellationToken,
) {
    loop {
        // Control messages (requests, haves) go ahead of piece uploads.
        let next_upload = || {
            uploads
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
        };
        let msg = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            m = outbox.recv() => match m { Some(m) => m, None => break },
            () = uploads.ready.notified(), if uploads.queue.lock().unwrap_or_else(|p| p.into_inner()).is_empty() => continue,
            Some(index) = async { next_upload() } => match read_piece(&blob, index).await {
                Some(data) => {
                    ctx.egress.acquire(data.len()).await;
                    ctx.metrics.bytes_to_peers.inc_by(data.len() as u64);
                    ctx.metrics.pieces_served.inc();
                    let data = if ctx.cfg.corrupt_uploads { corrupt(data) } else { data };
                    Message::Piece { index, data }
                }
                None => Message::Reject(index),
            },
        };
        if sink.send(msg).await.is_err() {
            break;
        }
    }
    cancel.cancel();
}

async fn read_piece(blob: &Blob, index: u32) -> Option<Bytes> {
    let blob = blob.clone();
    tokio::task::spawn_blocking(move || blob.read_piece(index))
        .await
        .ok()?
        .ok()
        .map(Bytes::from)
}

/// Test hook (`p2p.corrupt_uploads`): flips a byte of every piece served, to prove peers catch it.
fn corrupt(data: Bytes) -> Bytes {
    let mut v = data.to_vec();
    if let Some(b) = v.first_mut() {
        *b ^= 0xff;
    }
    Bytes::from(v)
}
