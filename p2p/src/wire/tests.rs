//! Framing round trips and hostile input.

use super::*;

fn round_trip(msg: Message) -> anyhow::Result<()> {
    let mut buf = BytesMut::new();
    Codec.encode(msg.clone(), &mut buf)?;
    // Byte by byte, as a slow socket would deliver it.
    let mut partial = BytesMut::new();
    let mut decoded = None;
    for b in buf.iter() {
        partial.put_u8(*b);
        if let Some(m) = Codec.decode(&mut partial)? {
            decoded = Some(m);
        }
    }
    assert_eq!(decoded, Some(msg));
    assert!(partial.is_empty());
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
    round_trip(Message::Piece {
        index: 3,
        data: Bytes::from(vec![9u8; 1000]),
    })?;
    round_trip(Message::Piece {
        index: 0,
        data: Bytes::new(),
    })?;
    round_trip(Message::Cancel(1))?;
    round_trip(Message::Reject(2))?;
    round_trip(Message::Goodbye("bye".into()))?;
    Ok(())
}

fn decode_raw(bytes: &[u8]) -> Result<Option<Message>, WireError> {
    Codec.decode(&mut BytesMut::from(bytes))
}

#[test]
fn hostile_frames_are_refused_without_allocating() {
    // A length field claiming 4 GiB: refused from the 4-byte header alone.
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
    assert!(matches!(
        Codec.decode(&mut buf),
        Err(WireError::Oversized(_))
    ));
    assert!(buf.capacity() < 1 << 20);
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
    Codec.encode(Message::Hello(hello), &mut buf)?;
    let mut bad_magic = buf.clone();
    bad_magic[5] = b'X';
    assert!(matches!(
        Codec.decode(&mut bad_magic),
        Err(WireError::BadHello(_))
    ));
    let mut bad_version = buf.clone();
    bad_version[10] = 99;
    assert!(matches!(
        Codec.decode(&mut bad_version),
        Err(WireError::BadHello(_))
    ));
    // A source length that points past the frame.
    let mut bad_source = buf.clone();
    let n = bad_source.len();
    bad_source[n - 1] = 10;
    assert!(matches!(
        Codec.decode(&mut bad_source),
        Err(WireError::BadHello(_))
    ));
    Ok(())
}
