//! One peer connection for one blob: the handshake, a reader that forwards what the peer says
//! to the torrent, and a writer that sends our messages and serves the peer's requests.
//!
//! Uploads are queued per connection (bounded) and served one piece at a time through the
//! node's egress limiter, so a connection holds at most one piece in memory for uploads. The
//! kernel keeps only a little unsent data per socket (`TCP_NOTSENT_LOWAT`), so the queue is the
//! real backlog. A request is answered with `Reject` (ask elsewhere) when we lack the piece,
//! when we are its only holder and already sending it to someone (super-seeding: the first copy
//! of a new piece goes to one peer, who passes it on, instead of our uplink carrying it to
//! everyone), or when our queue is busy and another peer has it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
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
/// Unsent bytes the kernel may hold per peer socket: enough to keep a fast link busy, small
/// enough that our own queue, not the socket buffer, says how busy we are.
const NOTSENT_LOWAT: u32 = 256 << 10;

/// Sets the socket options every peer connection uses.
pub(super) fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT)
}

/// Opens a connection to `addr` and exchanges hellos.
pub(super) async fn dial(addr: &str, hello: Hello) -> Result<(Transport, Hello), WireError> {
    let stream = tokio::time::timeout(HELLO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tune(&stream)?;
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

/// Per-piece counts a torrent shares with its connections.
#[derive(Debug, Default)]
pub(super) struct PieceCounts {
    /// How many of the torrent's peers have each piece.
    pub avail: Vec<AtomicU16>,
    /// How many of our connections have each piece queued or on the wire.
    pub uploading: Vec<AtomicU16>,
    /// Set while this peer fetches the blob upstream: its uplink is the only way new pieces
    /// enter the swarm, so it serves only pieces nobody else has.
    pub backsourcing: AtomicBool,
}

impl PieceCounts {
    pub fn new(pieces: u32) -> Self {
        let zeros = || (0..pieces).map(|_| AtomicU16::new(0)).collect();
        Self {
            avail: zeros(),
            uploading: zeros(),
            backsourcing: AtomicBool::new(false),
        }
    }

    fn get(counts: &[AtomicU16], index: u32) -> u16 {
        counts
            .get(index as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn add(counts: &[AtomicU16], index: u32, delta: i16) {
        if let Some(c) = counts.get(index as usize) {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                v.checked_add_signed(delta)
            });
        }
    }

    pub fn add_avail(&self, index: u32, delta: i16) {
        Self::add(&self.avail, index, delta);
    }
}

/// A connection's upload queue, shared by its reader (which fills it) and writer (which
/// drains it), keeping the torrent-wide `uploading` counts in step.
#[derive(Debug)]
struct Uploads {
    queue: Mutex<VecDeque<u32>>,
    ready: Notify,
    counts: Arc<PieceCounts>,
}

impl Uploads {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<u32>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, index: u32) {
        self.queue().push_back(index);
        PieceCounts::add(&self.counts.uploading, index, 1);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<u32> {
        self.queue().pop_front()
    }

    /// A popped piece has been sent (or given up on).
    fn done(&self, index: u32) {
        PieceCounts::add(&self.counts.uploading, index, -1);
    }

    fn cancel(&self, index: u32) {
        let mut queue = self.queue();
        let before = queue.len();
        queue.retain(|&i| i != index);
        for _ in queue.len()..before {
            self.done(index);
        }
    }

    /// Whether to turn a request for `index` away (see the module docs).
    fn should_reject(&self, index: u32, have: bool) -> bool {
        let queued = self.queue().len();
        let elsewhere = PieceCounts::get(&self.counts.avail, index) > 0;
        let sending = PieceCounts::get(&self.counts.uploading, index) > 0;
        let source = self.counts.backsourcing.load(Ordering::Relaxed);
        !have || (!elsewhere && sending) || (elsewhere && (source || queued >= BUSY_QUEUE))
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        let left: Vec<u32> = self.queue().drain(..).collect();
        for index in left {
            self.done(index);
        }
    }
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
    pub counts: Arc<PieceCounts>,
    pub ctx: Arc<SwarmCtx>,
    pub cancel: CancellationToken,
}

impl Conn {
    /// Runs until the peer hangs up, breaks the protocol, or the torrent drops us.
    pub(super) async fn run(self, framed: Transport) {
        let (sink, stream) = framed.split();
        let uploads = Arc::new(Uploads {
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            counts: self.counts.clone(),
        });
        let writer = tokio::spawn(write_loop(
            sink,
            self.outbox,
            uploads.clone(),
            self.blob.clone(),
            self.ctx.clone(),
            self.cancel.clone(),
        ));
        let reader = Reader {
            events: &self.events,
            conn: self.id,
            reply: &self.reply,
            uploads: &uploads,
            blob: &self.blob,
            ctx: &self.ctx,
        };
        let reason = tokio::select! {
            r = reader.run(stream) => r,
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

struct Reader<'a> {
    events: &'a mpsc::Sender<Event>,
    conn: u64,
    reply: &'a mpsc::Sender<Message>,
    uploads: &'a Uploads,
    blob: &'a Blob,
    ctx: &'a SwarmCtx,
}

impl Reader<'_> {
    /// Forwards what the peer says to the torrent and queues its requests; returns why it ended.
    async fn run(self, mut stream: futures::stream::SplitStream<Transport>) -> String {
        let conn = self.conn;
        loop {
            let msg = match stream.next().await {
                None => return "peer closed the connection".into(),
                Some(Err(e)) => return format!("protocol error: {e}"),
                Some(Ok(m)) => m,
            };
            let event = match msg {
                Message::Request(index) => {
                    if self.uploads.queue().len() >= MAX_QUEUED {
                        return format!("peer queued more than {MAX_QUEUED} requests");
                    }
                    if self
                        .uploads
                        .should_reject(index, self.blob.has_piece(index))
                    {
                        if self.reply.send(Message::Reject(index)).await.is_err() {
                            return "writer gone".into();
                        }
                    } else {
                        self.uploads.push(index);
                    }
                    continue;
                }
                Message::Cancel(index) => {
                    self.uploads.cancel(index);
                    continue;
                }
                Message::Piece { index, data } => {
                    self.ctx.ingress.acquire(data.len()).await;
                    Event::Piece { conn, index, data }
                }
                Message::Bitfield(bits) => Event::Bitfield { conn, bits },
                Message::Have(index) => Event::Have { conn, index },
                Message::Reject(index) => Event::Reject { conn, index },
                Message::Goodbye(reason) => return format!("peer said goodbye: {reason}"),
                Message::Hello(_) => return "second hello".into(),
            };
            if self.events.send(event).await.is_err() {
                return "torrent gone".into();
            }
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
        let (msg, uploaded) = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            m = outbox.recv() => match m { Some(m) => (m, None), None => break },
            () = uploads.ready.notified(), if uploads.queue().is_empty() => continue,
            Some(index) = async { uploads.pop() } => {
                // A node-wide cap on pieces being sent bounds upload memory whatever the number
                // of connections, and keeps each upload fast rather than many slow.
                let slot = ctx.upload_slots.clone().acquire_owned().await.ok();
                let msg = match read_piece(&blob, index).await {
                    Some(data) => {
                        ctx.egress.acquire(data.len()).await;
                        ctx.metrics.bytes_to_peers.inc_by(data.len() as u64);
                        ctx.metrics.pieces_served.inc();
                        let data = if ctx.cfg.corrupt_uploads { corrupt(data) } else { data };
                        Message::Piece { index, data }
                    }
                    None => Message::Reject(index),
                };
                (msg, Some((index, slot)))
            }
        };
        let sent = sink.send(msg).await;
        if let Some((index, _slot)) = uploaded {
            uploads.done(index);
        }
        if sent.is_err() {
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
