//! The peer wire protocol: length-prefixed binary frames over TCP, one connection per blob.
//!
//! ```text
//! frame   = length:u32be kind:u8 payload        (length counts kind + payload)
//! Hello   = 0  "SHOAL" version:u8 peer_id:[16] digest:[32] size:u64be source_len:u16be source(JSON)
//! Bitfield= 1  bits (packed, piece 0 in the high bit of byte 0)
//! Have    = 2  index:u32be
//! Request = 3  index:u32be
//! Piece   = 4  index:u32be data
//! Cancel  = 5  index:u32be
//! Reject  = 6  index:u32be      ("not from me": busy, or not present; ask elsewhere)
//! Goodbye = 7  reason (UTF-8)
//! ```
//!
//! Both sides send `Hello` first; the accepting side's always carries the blob size, so a node
//! that only knows a digest learns the layout from its first peer. Requests are for whole
//! pieces and are pipelined: a peer may have several in flight.
//!
//! A piece frame is not handled whole: [`Codec`] turns it into a [`Message::PieceHead`] and then
//! the data as [`Message::PieceData`] chunks of at most [`PIECE_CHUNK`] bytes, and encodes it
//! from the same messages, so neither side ever holds a whole piece for the wire (pieces go
//! between the socket and the store file chunk by chunk). The decoder checks every length before
//! allocating: a piece frame may be as long as the largest piece, but only one chunk of it is
//! buffered at a time, and every other frame is refused beyond [`MAX_CONTROL_FRAME`]; so a
//! hostile peer can make us hold at most one chunk or control frame per connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::digest::Digest;
use crate::metainfo::{MAX_PIECE_SIZE, MAX_PIECES};
use crate::upstream::BlobSource;

pub const PROTOCOL_VERSION: u8 = 1;
const MAGIC: &[u8; 5] = b"SHOAL";
/// Largest piece frame accepted: a maximal piece plus its index and kind.
const MAX_PIECE_FRAME: usize = MAX_PIECE_SIZE as usize + 5;
/// Largest frame of any other kind: a bitfield of the most pieces a blob may have, with room
/// for a hello (4 KiB of source at most) or a goodbye.
pub const MAX_CONTROL_FRAME: usize = (MAX_PIECES as usize).div_ceil(8) + 4096;
/// Most bytes of a piece's data one [`Message::PieceData`] carries, and what a reader buffers.
pub const PIECE_CHUNK: usize = 64 << 10;
const MAX_SOURCE_JSON: usize = 4096;
const MAX_REASON: usize = 1024;
/// Size field value meaning "I do not know the size yet".
pub const UNKNOWN_SIZE: u64 = u64::MAX;

/// A peer's identity: random per process, stable for its lifetime.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub [u8; 16]);

impl PeerId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(&self.0[..4]))
    }
}

impl std::str::FromStr for PeerId {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out)?;
        Ok(Self(out))
    }
}

impl serde::Serialize for PeerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PeerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub peer_id: PeerId,
    pub digest: Digest,
    /// Blob size, or [`UNKNOWN_SIZE`].
    pub size: u64,
    /// Where the blob can be fetched upstream, so a seed asked for a blob it lacks can fetch it.
    pub source: Option<BlobSource>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Bitfield(Bytes),
    Have(u32),
    Request(u32),
    /// A piece frame's header: `len` bytes of piece `index` follow as [`Message::PieceData`].
    PieceHead {
        index: u32,
        len: u32,
    },
    /// The next bytes of the piece being sent; nothing else is sent until all `len` have been.
    PieceData(Bytes),
    Cancel(u32),
    Reject(u32),
    Goodbye(String),
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Bitfield(_) => "bitfield",
            Message::Have(_) => "have",
            Message::Request(_) => "request",
            Message::PieceHead { .. } => "piece",
            Message::PieceData(_) => "piece data",
            Message::Cancel(_) => "cancel",
            Message::Reject(_) => "reject",
            Message::Goodbye(_) => "goodbye",
        }
    }
}

/// Why a frame was refused. Each closes the connection with this as the logged reason.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{kind} frame of {len} bytes is over the {limit} byte limit")]
    Oversized {
        kind: &'static str,
        len: usize,
        limit: usize,
    },
    /// Our own sender broke the framing: another message in the middle of a piece...
    #[error("{kind} frame sent while {left} bytes of a piece are still due")]
    Interleaved { kind: &'static str, left: usize },
    /// ...or more piece data than the piece's header announced.
    #[error("{got} bytes of piece data sent where {left} were due")]
    PieceOverrun { got: usize, left: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("{kind} frame has a bad length {len}")]
    BadLength { kind: &'static str, len: usize },
    #[error("hello: {0}")]
    BadHello(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Encoder and decoder of [`Message`] frames. It tracks where it is in a piece's data, so use
/// one per connection (and direction).
#[derive(Debug, Default)]
pub struct Codec {
    /// Bytes of the piece being received that are still to come.
    recv_left: usize,
    /// Bytes of the piece being sent that are still to be encoded.
    send_left: usize,
}

impl Decoder for Codec {
    type Item = Message;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        if self.recv_left > 0 {
            // Inside a piece: hand on its data a chunk at a time, and let the socket fill one
            // chunk's worth of buffer at most.
            let want = self.recv_left.min(PIECE_CHUNK);
            if src.len() < want {
                src.reserve(want - src.len());
                return Ok(None);
            }
            self.recv_left -= want;
            return Ok(Some(Message::PieceData(src.split_to(want).freeze())));
        }
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(src[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            return Err(WireError::Empty);
        }
        if src.len() < 5 {
            return Ok(None);
        }
        if src[4] == 4 {
            if len > MAX_PIECE_FRAME {
                return Err(WireError::Oversized {
                    kind: "piece",
                    len,
                    limit: MAX_PIECE_FRAME,
                });
            }
            if len < 5 {
                return Err(WireError::BadLength { kind: "piece", len });
            }
            if src.len() < 9 {
                return Ok(None);
            }
            src.advance(5);
            let index = src.get_u32();
            self.recv_left = len - 5;
            return Ok(Some(Message::PieceHead {
                index,
                len: (len - 5) as u32,
            }));
        }
        if len > MAX_CONTROL_FRAME {
            return Err(WireError::Oversized {
                kind: "control",
                len,
                limit: MAX_CONTROL_FRAME,
            });
        }
        if src.len() < 4 + len {
            // Reserve only what this (bounded) frame needs.
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let mut frame = src.split_to(len).freeze();
        let kind = frame.get_u8();
        decode_body(kind, frame).map(Some)
    }
}

fn index_of(kind: &'static str, mut body: Bytes) -> Result<u32, WireError> {
    if body.len() != 4 {
        return Err(WireError::BadLength {
            kind,
            len: body.len(),
        });
    }
    Ok(body.get_u32())
}

fn decode_body(kind: u8, mut body: Bytes) -> Result<Message, WireError> {
    Ok(match kind {
        0 => Message::Hello(decode_hello(body)?),
        1 => Message::Bitfield(body),
        2 => Message::Have(index_of("have", body)?),
        3 => Message::Request(index_of("request", body)?),
        5 => Message::Cancel(index_of("cancel", body)?),
        6 => Message::Reject(index_of("reject", body)?),
        7 => {
            body.truncate(MAX_REASON);
            Message::Goodbye(String::from_utf8_lossy(&body).into_owned())
        }
        other => return Err(WireError::UnknownKind(other)),
    })
}

fn decode_hello(mut body: Bytes) -> Result<Hello, WireError> {
    const FIXED: usize = 5 + 1 + 16 + 32 + 8 + 2;
    if body.len() < FIXED {
        return Err(WireError::BadLength {
            kind: "hello",
            len: body.len(),
        });
    }
    if &body[..5] != MAGIC {
        return Err(WireError::BadHello("not a shoal peer (bad magic)".into()));
    }
    body.advance(5);
    let version = body.get_u8();
    if version != PROTOCOL_VERSION {
        return Err(WireError::BadHello(format!(
            "protocol version {version}, we speak {PROTOCOL_VERSION}"
        )));
    }
    let mut peer_id = [0u8; 16];
    body.copy_to_slice(&mut peer_id);
    let mut digest = [0u8; 32];
    body.copy_to_slice(&mut digest);
    let size = body.get_u64();
    let source_len = body.get_u16() as usize;
    if source_len > MAX_SOURCE_JSON || body.len() != source_len {
        return Err(WireError::BadHello(format!(
            "source of {source_len} bytes, frame has {}",
            body.len()
        )));
    }
    let source = if source_len == 0 {
        None
    } else {
        Some(
            serde_json::from_slice(&body)
                .map_err(|e| WireError::BadHello(format!("source: {e}")))?,
        )
    };
    Ok(Hello {
        peer_id: PeerId(peer_id),
        digest: Digest::from_bytes(digest),
        size,
        source,
    })
}

impl Encoder<Message> for Codec {
    type Error = WireError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), WireError> {
        match msg {
            Message::PieceData(data) => {
                if data.len() > self.send_left {
                    return Err(WireError::PieceOverrun {
                        got: data.len(),
                        left: self.send_left,
                    });
                }
                self.send_left -= data.len();
                dst.extend_from_slice(&data);
                return Ok(());
            }
            _ if self.send_left > 0 => {
                return Err(WireError::Interleaved {
                    kind: msg.kind(),
                    left: self.send_left,
                });
            }
            Message::PieceHead { index, len } => {
                let frame = len as usize + 5;
                if frame > MAX_PIECE_FRAME {
                    return Err(WireError::Oversized {
                        kind: "piece",
                        len: frame,
                        limit: MAX_PIECE_FRAME,
                    });
                }
                dst.reserve(9);
                dst.put_u32(frame as u32);
                dst.put_u8(4);
                dst.put_u32(index);
                self.send_left = len as usize;
                return Ok(());
            }
            _ => {}
        }
        let name = msg.kind();
        let (kind, body_len) = match &msg {
            Message::Hello(h) => (0u8, 64 + h.source.as_ref().map_or(0, |_| MAX_SOURCE_JSON)),
            Message::Bitfield(b) => (1, b.len()),
            Message::Have(_) => (2, 4),
            Message::Request(_) => (3, 4),
            Message::Cancel(_) => (5, 4),
            Message::Reject(_) => (6, 4),
            Message::Goodbye(r) => (7, r.len().min(MAX_REASON)),
            Message::PieceHead { .. } | Message::PieceData(_) => unreachable!("encoded above"),
        };
        dst.reserve(5 + body_len);
        let start = dst.len();
        dst.put_u32(0); // patched below
        dst.put_u8(kind);
        match msg {
            Message::Hello(h) => {
                let source = match &h.source {
                    Some(s) => {
                        serde_json::to_vec(s).map_err(|e| WireError::BadHello(e.to_string()))?
                    }
                    None => Vec::new(),
                };
                if source.len() > MAX_SOURCE_JSON {
                    return Err(WireError::BadHello("source too long".into()));
                }
                dst.put_slice(MAGIC);
                dst.put_u8(PROTOCOL_VERSION);
                dst.put_slice(&h.peer_id.0);
                dst.put_slice(h.digest.as_bytes());
                dst.put_u64(h.size);
                dst.put_u16(source.len() as u16);
                dst.put_slice(&source);
            }
            Message::Bitfield(b) => dst.put_slice(&b),
            Message::Have(i) | Message::Request(i) | Message::Cancel(i) | Message::Reject(i) => {
                dst.put_u32(i)
            }
            Message::PieceHead { .. } | Message::PieceData(_) => unreachable!("encoded above"),
            Message::Goodbye(r) => {
                let mut end = r.len().min(MAX_REASON);
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                dst.put_slice(&r.as_bytes()[..end]);
            }
        }
        let len = dst.len() - start - 4;
        if len > MAX_CONTROL_FRAME {
            dst.truncate(start);
            return Err(WireError::Oversized {
                kind: name,
                len,
                limit: MAX_CONTROL_FRAME,
            });
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
