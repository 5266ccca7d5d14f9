//! One peer connection for one blob: the handshake, a reader that forwards what the peer says
//! to the torrent, and a writer that sends our messages and serves the peer's requests.
//!
//! Pieces move between the socket and the store file a chunk at a time ([`PIECE_CHUNK`]), never
//! whole: the writer reads a piece it uploads from the store chunk by chunk, and the reader
//! writes a piece it receives into the store as it arrives (`sink.rs`) and hands the torrent the
//! claimed, hashed piece to commit. The reader takes only pieces we asked this peer for.
//!
//! Uploads are queued per connection (bounded) and served one piece at a time through the
//! node's egress limiter. The kernel keeps only a little unsent data per socket
//! (`TCP_NOTSENT_LOWAT`), so the queue is the real backlog. A request is answered with `Reject`
//! (ask elsewhere) when we lack the piece, when we are its only holder and already sending it to
//! someone (super-seeding: the first copy of a new piece goes to one peer, who passes it on,
//! instead of our uplink carrying it to everyone), or when our queue (this connection's, or
//! the torrent's over all connections) is busy and another peer has it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace};

use super::SwarmCtx;
use super::sink::PieceSink;
use super::torrent::{Event, REQUEST_TIMEOUT};
use crate::store::{Blob, PieceWriter, StoreError};
use crate::wire::{Codec, Hello, Message, PIECE_CHUNK, PeerId, WireError};

pub(super) type Transport = Framed<TcpStream, Codec>;

/// Pieces a peer may have queued with us at once; more is a protocol violation.
const MAX_QUEUED: usize = 16;
/// Above this many queued uploads we turn away requests other peers can serve.
const BUSY_QUEUE: usize = 2;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Unsent bytes the kernel may hold per peer socket: enough to keep a fast link busy, small
/// enough that our own queue, not the socket buffer, says how busy we are.
const NOTSENT_LOWAT: u32 = 256 << 10;

/// How long sent data may go unacknowledged before the kernel drops the connection: a peer
/// that vanished without closing must not hold an upload (and its queue, which counts against
/// the torrent's) until TCP's own retries give up, 15 minutes later.
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets the socket options every peer connection uses.
pub(super) fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    sock.set_tcp_notsent_lowat(NOTSENT_LOWAT)
}

/// Opens a connection to `addr` and exchanges hellos.
pub(super) async fn dial(addr: &str, hello: Hello) -> Result<(Transport, Hello), WireError> {
    let stream = tokio::time::timeout(HELLO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tune(&stream)?;
    let mut framed = Framed::new(stream, Codec::default());
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
            other.kind()
        ))),
        Ok(Some(Err(e))) => Err(e),
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
    /// Uploads queued or on the wire over all of the torrent's connections.
    uploads: AtomicUsize,
    /// From this many uploads on, requests for pieces other peers have are turned away (0: no
    /// torrent-wide bound, before the blob's layout is known).
    busy_uploads: usize,
}

impl PieceCounts {
    /// Counts for `pieces` pieces; `busy_uploads`: see [`PieceCounts::busy_uploads`].
    pub fn new(pieces: u32, busy_uploads: usize) -> Self {
        let zeros = || (0..pieces).map(|_| AtomicU16::new(0)).collect();
        Self {
            avail: zeros(),
            uploading: zeros(),
            backsourcing: AtomicBool::new(false),
            uploads: AtomicUsize::new(0),
            busy_uploads,
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
    /// Requested pieces, with when they were asked for.
    queue: Mutex<VecDeque<(u32, Instant)>>,
    ready: Notify,
    counts: Arc<PieceCounts>,
}

impl Uploads {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<(u32, Instant)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, index: u32) {
        self.queue().push_back((index, Instant::now()));
        PieceCounts::add(&self.counts.uploading, index, 1);
        self.counts.uploads.fetch_add(1, Ordering::Relaxed);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<(u32, Instant)> {
        self.queue().pop_front()
    }

    /// A popped piece has been sent (or given up on).
    fn done(&self, index: u32) {
        PieceCounts::add(&self.counts.uploading, index, -1);
        let _ = self
            .counts
            .uploads
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    fn cancel(&self, index: u32) {
        let mut queue = self.queue();
        let before = queue.len();
        queue.retain(|&(i, _)| i != index);
        for _ in queue.len()..before {
            self.done(index);
        }
    }

    /// Why to turn a request for `index` away, if we should (see the module docs).
    fn should_reject(&self, index: u32, have: bool) -> Option<&'static str> {
        let queued = self.queue().len();
        // Two other holders, not one: the one may be turning requests away too (both
        // back-sourcers fetched the piece, or both are busy), and two peers that each count on
        // the other would leave the piece stuck.
        let elsewhere = PieceCounts::get(&self.counts.avail, index) >= 2;
        let sending = PieceCounts::get(&self.counts.uploading, index) > 0;
        let source = self.counts.backsourcing.load(Ordering::Relaxed);
        // A long queue is a long wait for every request in it: at the end of a swarm every
        // peer asks the few complete ones, whose queues would hold seconds of pieces.
        let busy = queued >= BUSY_QUEUE
            || (self.counts.busy_uploads > 0
                && self.counts.uploads.load(Ordering::Relaxed) >= self.counts.busy_uploads);
        if !have {
            Some("missing")
        } else if !elsewhere && sending {
            Some("sending")
        } else if elsewhere && source {
            Some("backsourcing")
        } else if elsewhere && busy {
            Some("busy")
        } else {
            None
        }
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        let left: Vec<u32> = self.queue().drain(..).map(|(i, _)| i).collect();
        for index in left {
            self.done(index);
        }
    }
}

/// Pieces we asked this peer for and have not received, with when we asked: the writer adds a
/// request as it sends it and drops a cancelled one, the reader takes each piece that arrives
/// out (or a reject).
#[derive(Debug, Default)]
struct Asked(Mutex<HashMap<u32, Instant>>);

impl Asked {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Instant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes what an outgoing message asks for or takes back.
    fn sending(&self, msg: &Message) {
        match msg {
            Message::Request(index) => {
                self.lock().insert(*index, Instant::now());
            }
            Message::Cancel(index) => {
                self.lock().remove(index);
            }
            _ => {}
        }
    }

    /// When `index` was asked for, if it was; it no longer is.
    fn take(&self, index: u32) -> Option<Instant> {
        self.lock().remove(&index)
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
        let asked = Arc::new(Asked::default());
        let writer = tokio::spawn(
            Writer {
                peer_id: self.peer_id,
                sink,
                uploads: uploads.clone(),
                asked: asked.clone(),
                blob: self.blob.clone(),
                ctx: self.ctx.clone(),
            }
            .run(self.outbox, self.cancel.clone()),
        );
        let reader = Reader {
            peer_id: self.peer_id,
            events: &self.events,
            conn: self.id,
            reply: &self.reply,
            uploads: &uploads,
            asked: &asked,
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

type Stream = futures::stream::SplitStream<Transport>;

struct Reader<'a> {
    peer_id: PeerId,
    events: &'a mpsc::Sender<Event>,
    conn: u64,
    reply: &'a mpsc::Sender<Message>,
    uploads: &'a Uploads,
    asked: &'a Asked,
    blob: &'a Blob,
    ctx: &'a SwarmCtx,
}

impl Reader<'_> {
    /// Forwards what the peer says to the torrent and queues its requests; returns why it ended.
    async fn run(self, mut stream: Stream) -> String {
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
                    if let Some(why) = self
                        .uploads
                        .should_reject(index, self.blob.has_piece(index))
                    {
                        trace!(index, peer = ?self.peer_id, why, "request refused");
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
                Message::PieceHead { index, len } => {
                    match self.receive_piece(&mut stream, index, len).await {
                        Ok(piece) => Event::Piece { conn, index, piece },
                        Err(reason) => return reason,
                    }
                }
                Message::PieceData(_) => return "piece data outside a piece".into(),
                Message::Bitfield(bits) => Event::Bitfield { conn, bits },
                Message::Have(index) => Event::Have { conn, index },
                Message::Reject(index) => {
                    self.asked.take(index);
                    Event::Reject { conn, index }
                }
                Message::Goodbye(reason) => return format!("peer said goodbye: {reason}"),
                Message::Hello(_) => return "second hello".into(),
            };
            if self.events.send(event).await.is_err() {
                return "torrent gone".into();
            }
        }
    }

    /// Receives the `len` bytes of piece `index` into the store, for the torrent to commit.
    /// `None` if we did not ask for it, the store has it or is writing it already, or it took
    /// longer than the torrent waits for a request: its bytes are read and dropped. `Err` says
    /// why the connection must end.
    async fn receive_piece(
        &self,
        stream: &mut Stream,
        index: u32,
        len: u32,
    ) -> Result<Option<Result<PieceWriter, StoreError>>, String> {
        let asked = self.asked.take(index);
        // The piece is claimed while it arrives: a peer that stalls must not keep it from
        // others once the torrent has given up on this request and asked elsewhere.
        let deadline = asked.map(|at| at + REQUEST_TIMEOUT);
        let mut sink = if asked.is_some() {
            match self.blob.piece_writer(index) {
                Ok(Some(piece)) if piece.len() == len as usize => Some(Ok(PieceSink::new(piece))),
                Ok(Some(piece)) => Some(Err(StoreError::PieceLength {
                    digest: self.blob.digest(),
                    index,
                    got: len as usize,
                    expected: piece.len(),
                })),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            }
        } else {
            None
        };
        let mut left = len as usize;
        while left > 0 {
            let next = match (&sink, deadline) {
                (Some(Ok(_)), Some(deadline)) => {
                    match tokio::time::timeout_at(deadline, stream.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            sink = None;
                            continue;
                        }
                    }
                }
                _ => stream.next().await,
            };
            let chunk = match next {
                Some(Ok(Message::PieceData(chunk))) => chunk,
                Some(Ok(other)) => return Err(format!("{} inside a piece", other.kind())),
                Some(Err(e)) => return Err(format!("protocol error: {e}")),
                None => return Err("peer closed the connection inside a piece".into()),
            };
            // The codec never hands out more than the piece's header announced.
            left = left.saturating_sub(chunk.len());
            self.ctx.ingress.acquire(chunk.len()).await;
            if let Some(Ok(s)) = &mut sink
                && let Err(e) = s.append(chunk).await
            {
                sink = Some(Err(e));
            }
        }
        Ok(match sink {
            None => None,
            Some(Ok(s)) => Some(s.finish().await),
            Some(Err(e)) => Some(Err(e)),
        })
    }
}

/// Sends our messages and the pieces the peer asked for.
struct Writer {
    peer_id: PeerId,
    sink: futures::stream::SplitSink<Transport, Message>,
    uploads: Arc<Uploads>,
    asked: Arc<Asked>,
    blob: Blob,
    ctx: Arc<SwarmCtx>,
}

impl Writer {
    async fn run(mut self, mut outbox: mpsc::Receiver<Message>, cancel: CancellationToken) {
        loop {
            // Control messages (requests, haves) go ahead of piece uploads.
            let sent = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                m = outbox.recv() => match m {
                    Some(msg) => {
                        self.asked.sending(&msg);
                        self.sink.send(msg).await
                    }
                    None => break,
                },
                () = self.uploads.ready.notified(), if self.uploads.queue().is_empty() => continue,
                Some((index, asked)) = async { self.uploads.pop() } => {
                    // A node-wide cap on pieces being sent keeps each upload fast rather than
                    // many slow.
                    let slot = self.ctx.upload_slots.clone().acquire_owned().await.ok();
                    let start = Instant::now();
                    let sent = self.upload(index).await;
                    drop(slot);
                    trace!(
                        index,
                        peer = ?self.peer_id,
                        waited_ms = (start - asked).as_millis() as u64,
                        sent_ms = start.elapsed().as_millis() as u64,
                        "piece uploaded"
                    );
                    self.uploads.done(index);
                    sent
                }
            };
            if let Err(e) = sent {
                debug!(digest = ?self.blob.digest(), error = %e, "sending to peer");
                break;
            }
        }
        cancel.cancel();
    }

    /// Sends piece `index` from the store a chunk at a time, or a `Reject` if we cannot read it.
    async fn upload(&mut self, index: u32) -> Result<(), WireError> {
        let range = self.blob.layout().piece_range(index);
        let first = if self.blob.has_piece(index) {
            read_chunk(&self.blob, range.start, range.end).await
        } else {
            None
        };
        let Some(mut chunk) = first else {
            return self.sink.send(Message::Reject(index)).await;
        };
        let len = (range.end - range.start) as u32;
        self.sink.feed(Message::PieceHead { index, len }).await?;
        if self.ctx.cfg.corrupt_uploads {
            chunk = corrupt(chunk);
        }
        let mut pos = range.start;
        loop {
            self.ctx.egress.acquire(chunk.len()).await;
            self.ctx.metrics.bytes_to_peers.inc_by(chunk.len() as u64);
            pos += chunk.len() as u64;
            self.sink.send(Message::PieceData(chunk)).await?;
            if pos == range.end {
                break;
            }
            // Half a piece is already on the wire: the connection cannot go on without the rest.
            chunk = read_chunk(&self.blob, pos, range.end)
                .await
                .ok_or_else(|| std::io::Error::other(format!("piece {index} left the store")))?;
        }
        self.ctx.metrics.pieces_served.inc();
        Ok(())
    }
}

/// Reads the next chunk of a piece at `pos` (up to `end`); `None` if the store lacks it.
async fn read_chunk(blob: &Blob, pos: u64, end: u64) -> Option<Bytes> {
    let blob = blob.clone();
    // Allocated here, not on the blocking pool: memory freed by a thread goes back to the
    // malloc arena it came from, and each of the pool's many short-lived threads would
    // otherwise keep an arena of chunks to itself.
    let mut buf = vec![0u8; (end - pos).min(PIECE_CHUNK as u64) as usize];
    tokio::task::spawn_blocking(move || blob.read_at(pos, &mut buf).map(|()| Bytes::from(buf)))
        .await
        .ok()?
        .ok()
}

/// Test hook (`p2p.corrupt_uploads`): flips a byte of every piece served, to prove peers catch it.
fn corrupt(data: Bytes) -> Bytes {
    let mut v = data.to_vec();
    if let Some(b) = v.first_mut() {
        *b ^= 0xff;
    }
    Bytes::from(v)
}
