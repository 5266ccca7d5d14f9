//! Framing round trips and hostile input.

use super::*;

/// Encodes `msgs`, feeds the bytes to a decoder one at a time (as a slow socket would deliver
/// them), and returns what it decoded.
fn decode_slowly(msgs: &[Message]) -> anyhow::Result<Vec<Message>> {
    let mut buf = BytesMut::new();
    let mut codec = Codec::default();
    for msg in msgs {
        codec.encode(msg.clone(), &mut buf)?;
    }
    let (mut partial, mut codec, mut decoded) = (BytesMut::new(), Codec::default(), Vec::new());
    for b in buf.iter() {
        partial.put_u8(*b);
        while let Some(m) = codec.decode(&mut partial)? {
            decoded.push(m);
        }
    }
    assert!(partial.is_empty());
    Ok(decoded)
}

fn round_trip(msg: Message) -> anyhow::Result<()> {
    assert_eq!(decode_slowly(std::slice::from_ref(&msg))?, vec![msg]);
    Ok(())
}

#[test]
fn every_message_round_trips() -> anyhow::Result<()> {
    let hello = Hello {
        peer_id: PeerId::random(),
        digest: Digest::of(b"blob"),
        size: 123,
        source: Some(BlobSource {
            registry: "127.0.0.1:5000".into(),
            repository: "a/b".into(),
        }),
    };
    round_trip(Message::Hello(hello.clone()))?;
    round_trip(Message::Hello(Hello {
        source: None,
        size: UNKNOWN_SIZE,
        ..hello
    }))?;
    round_trip(Message::Bitfield(Bytes::from_static(&[0x80, 0x01])))?;
    round_trip(Message::Have(7))?;
    round_trip(Message::Request(u32::MAX))?;
    round_trip(Message::PieceHead { index: 0, len: 0 })?;
    round_trip(Message::Cancel(1))?;
    round_trip(Message::Reject(2))?;
    round_trip(Message::Goodbye("bye".into()))?;
    Ok(())
}

fn decode_raw(bytes: &[u8]) -> Result<Option<Message>, WireError> {
    Codec::default().decode(&mut BytesMut::from(bytes))
}

#[test]
fn a_piece_arrives_in_bounded_chunks() -> anyhow::Result<()> {
    let data: Vec<u8> = (0..PIECE_CHUNK * 2 + 100).map(|i| i as u8).collect();
    let head = Message::PieceHead {
        index: 7,
        len: data.len() as u32,
    };
    // The sender may cut the data as it likes; the receiver gets it in chunks of its own.
    let sent = [
        head.clone(),
        Message::PieceData(Bytes::copy_from_slice(&data[..10])),
        Message::PieceData(Bytes::copy_from_slice(&data[10..])),
        Message::Have(1),
    ];
    let decoded = decode_slowly(&sent)?;
    assert_eq!(decoded[0], head);
    assert_eq!(decoded.last(), Some(&Message::Have(1)));
    let mut got = Vec::new();
    for m in &decoded[1..decoded.len() - 1] {
        let Message::PieceData(chunk) = m else {
            anyhow::bail!("{} inside a piece", m.kind());
        };
        assert!(!chunk.is_empty() && chunk.len() <= PIECE_CHUNK);
        got.extend_from_slice(chunk);
    }
    assert_eq!(got, data);

    // A maximal piece is announced without the receiver reserving more than a chunk.
    let mut buf = BytesMut::new();
    Codec::default().encode(
        Message::PieceHead {
            index: 0,
            len: MAX_PIECE_SIZE,
        },
        &mut buf,
    )?;
    let mut codec = Codec::default();
    assert!(matches!(
        codec.decode(&mut buf)?,
        Some(Message::PieceHead { .. })
    ));
    assert!(codec.decode(&mut buf)?.is_none());
    assert!(buf.capacity() <= PIECE_CHUNK);
    Ok(())
}

#[test]
fn the_encoder_keeps_a_piece_frame_whole() -> anyhow::Result<()> {
    let mut codec = Codec::default();
    let mut buf = BytesMut::new();
    codec.encode(Message::PieceHead { index: 1, len: 4 }, &mut buf)?;
    assert!(matches!(
        codec.encode(Message::Have(2), &mut buf),
        Err(WireError::Interleaved { left: 4, .. })
    ));
    codec.encode(Message::PieceData(Bytes::from_static(b"ab")), &mut buf)?;
    assert!(matches!(
        codec.encode(Message::PieceData(Bytes::from_static(b"cde")), &mut buf),
        Err(WireError::PieceOverrun { got: 3, left: 2 })
    ));
    codec.encode(Message::PieceData(Bytes::from_static(b"cd")), &mut buf)?;
    codec.encode(Message::Have(2), &mut buf)?;
    assert!(matches!(
        Codec::default().encode(Message::PieceData(Bytes::from_static(b"x")), &mut buf),
        Err(WireError::PieceOverrun { got: 1, left: 0 })
    ));
    assert!(matches!(
        Codec::default().encode(
            Message::Bitfield(vec![0; MAX_CONTROL_FRAME].into()),
            &mut buf
        ),
        Err(WireError::Oversized { .. })
    ));
    Ok(())
}

#[test]
fn hostile_frames_are_refused_without_allocating() {
    // A length field claiming 4 GiB: refused from the header alone, for a piece or not.
    for kind in [1, 4] {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, kind][..]);
        assert!(matches!(
            Codec::default().decode(&mut buf),
            Err(WireError::Oversized { .. })
        ));
        assert!(buf.capacity() < 1 << 20);
    }
    // A control frame may not be as long as a piece.
    let len = (MAX_CONTROL_FRAME as u32 + 1).to_be_bytes();
    assert!(matches!(
        decode_raw(&[len[0], len[1], len[2], len[3], 1]),
        Err(WireError::Oversized { .. })
    ));
    assert!(matches!(decode_raw(&[0, 0, 0, 0]), Err(WireError::Empty)));
    assert!(matches!(
        decode_raw(&[0, 0, 0, 1, 42]),
        Err(WireError::UnknownKind(42))
    ));
    assert!(matches!(
        decode_raw(&[0, 0, 0, 3, 2, 0, 0]),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        decode_raw(&[0, 0, 0, 2, 4, 0]),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        decode_raw(&[0, 0, 0, 6, 0, b'H', b'T', b'T', b'P', b'/']),
        Err(WireError::BadLength { .. })
    ));
    // Incomplete frames wait for more bytes.
    assert!(matches!(decode_raw(&[0, 0, 0, 5, 2, 0]), Ok(None)));
}

#[test]
fn hostile_hellos_are_refused() -> anyhow::Result<()> {
    let hello = Hello {
        peer_id: PeerId::random(),
        digest: Digest::of(b"x"),
        size: 1,
        source: None,
    };
    let mut buf = BytesMut::new();
    Codec::default().encode(Message::Hello(hello), &mut buf)?;
    let mut bad_magic = buf.clone();
    bad_magic[5] = b'X';
    assert!(matches!(
        Codec::default().decode(&mut bad_magic),
        Err(WireError::BadHello(_))
    ));
    let mut bad_version = buf.clone();
    bad_version[10] = 99;
    assert!(matches!(
        Codec::default().decode(&mut bad_version),
        Err(WireError::BadHello(_))
    ));
    // A source length that points past the frame.
    let mut bad_source = buf.clone();
    let n = bad_source.len();
    bad_source[n - 1] = 10;
    assert!(matches!(
        Codec::default().decode(&mut bad_source),
        Err(WireError::BadHello(_))
    ));
    Ok(())
}
