//! Blob size and range reads: ranges, 404, retries of 503 and of a body broken off, a server
//! that ignores `Range`, and names refused before any request.

use super::*;

#[tokio::test]
async fn reads_blob_size_and_ranges() -> anyhow::Result<()> {
    let (data, digest) = test_blob();
    let blob = data.clone();
    let server = TestServer::start(|_| {
        Router::new().route(
            BLOB_ROUTE,
            get(move |headers: HeaderMap| async move { serve_blob(&blob, &headers) }),
        )
    })
    .await?;
    let upstream = server.client("{}", 0)?;
    let src = server.source();

    assert_eq!(upstream.blob_size(&src, &digest).await?, data.len() as u64);
    assert_eq!(
        upstream.fetch_range(&src, &digest, 10..5_000).await?,
        data.slice(10..5_000)
    );
    assert_eq!(upstream.fetch_range(&src, &digest, 0..100_000).await?, data);
    assert_eq!(
        upstream.fetch_range(&src, &digest, 99_999..100_000).await?,
        data.slice(99_999..)
    );
    assert!(upstream.fetch_range(&src, &digest, 7..7).await?.is_empty());

    let past_end = upstream.fetch_range(&src, &digest, 100_000..100_010).await;
    assert!(
        matches!(past_end, Err(Error::Status { status: 416, .. })),
        "{past_end:?}"
    );
    Ok(())
}

#[tokio::test]
async fn missing_blob_is_not_found_and_not_retried() -> anyhow::Result<()> {
    let requests = counter();
    let seen = requests.clone();
    let server = TestServer::start(|_| {
        Router::new().route(
            BLOB_ROUTE,
            get(move || async move {
                seen.fetch_add(1, Ordering::SeqCst);
                StatusCode::NOT_FOUND
            }),
        )
    })
    .await?;
    let upstream = server.client("{}", 4)?;
    let digest = Digest::of(b"nothing");

    let err = upstream
        .fetch_range(&server.source(), &digest, 0..10)
        .await
        .err()
        .context("found")?;
    assert!(err.is_not_found() && !err.is_retryable(), "{err:?}");
    let msg = err.to_string();
    for part in [server.registry.as_str(), REPO, &digest.to_string()] {
        assert!(msg.contains(part), "{msg:?} lacks {part}");
    }
    assert_eq!(hits(&requests), 1);
    Ok(())
}

#[tokio::test]
async fn retries_503_until_the_registry_recovers() -> anyhow::Result<()> {
    let (data, digest) = test_blob();
    let requests = counter();
    let seen = requests.clone();
    let server = TestServer::start(|_| {
        Router::new().route(
            BLOB_ROUTE,
            get(move |headers: HeaderMap| async move {
                // Every third request succeeds.
                if seen.fetch_add(1, Ordering::SeqCst) % 3 < 2 {
                    StatusCode::SERVICE_UNAVAILABLE.into_response()
                } else {
                    serve_blob(&data, &headers)
                }
            }),
        )
    })
    .await?;
    let src = server.source();

    let patient = server.client("{}", 4)?;
    assert_eq!(patient.fetch_range(&src, &digest, 0..10).await?.len(), 10);
    assert_eq!(hits(&requests), 3);

    let impatient = server.client("{}", 1)?;
    let err = impatient
        .fetch_range(&src, &digest, 0..10)
        .await
        .err()
        .context("no 503")?;
    assert!(
        matches!(err, Error::Status { status: 503, .. }) && err.is_retryable(),
        "{err:?}"
    );
    assert_eq!(hits(&requests), 5);
    Ok(())
}

/// Records what [`Upstream::fetch_range_into`] hands it.
#[derive(Default)]
struct Recorder {
    bytes: Vec<u8>,
    restarts: usize,
}

impl RangeSink for Recorder {
    fn restart(&mut self) {
        self.bytes.clear();
        self.restarts += 1;
    }

    fn write(&mut self, chunk: Bytes) -> impl Future<Output = std::io::Result<()>> + Send {
        self.bytes.extend_from_slice(&chunk);
        std::future::ready(Ok(()))
    }
}

#[tokio::test]
async fn a_range_broken_mid_body_is_streamed_again_from_its_start() -> anyhow::Result<()> {
    let (data, digest) = test_blob();
    let blob = data.clone();
    let requests = counter();
    let seen = requests.clone();
    let server = TestServer::start(|_| {
        Router::new().route(
            BLOB_ROUTE,
            get(move |headers: HeaderMap| async move {
                if seen.fetch_add(1, Ordering::SeqCst) > 0 {
                    return serve_blob(&blob, &headers);
                }
                // The first answer breaks off after some of the body.
                let body = futures::stream::iter([
                    Ok(Bytes::from_static(&[7u8; 1000])),
                    Err(std::io::Error::other("connection reset")),
                ]);
                Response::builder()
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_LENGTH, 50_000)
                    .body(Body::from_stream(body))
                    .unwrap_or_default()
            }),
        )
    })
    .await?;
    let upstream = server.client("{}", 2)?;
    let mut sink = Recorder::default();
    upstream
        .fetch_range_into(&server.source(), &digest, 10..50_010, &mut sink)
        .await?;
    assert_eq!(sink.bytes, data.slice(10..50_010));
    assert_eq!((sink.restarts, hits(&requests)), (2, 2));
    Ok(())
}

#[tokio::test]
async fn range_ignored_with_huge_body_fails_without_reading_it() -> anyhow::Result<()> {
    const HUGE: u64 = 64 << 30;
    let streamed = Arc::new(AtomicU64::new(0));
    let sent = streamed.clone();
    let server = TestServer::start(|_| {
        Router::new().route(
            BLOB_ROUTE,
            get(move || async move {
                let chunk = Bytes::from(vec![0u8; 64 << 10]);
                let body = futures::stream::repeat_with(move || {
                    sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(chunk.clone())
                });
                Response::builder()
                    .header(header::CONTENT_LENGTH, HUGE)
                    .body(Body::from_stream(body))
                    .unwrap_or_default()
            }),
        )
    })
    .await?;
    let upstream = server.client("{}", 4)?;
    let digest = Digest::of(b"huge");

    for range in [1_000..2_000, 0..1_000] {
        let started = std::time::Instant::now();
        let err = upstream
            .fetch_range(&server.source(), &digest, range)
            .await
            .err()
            .context("ranged")?;
        assert!(
            matches!(
                err,
                Error::RangeIgnored {
                    status: 200,
                    content_length: Some(HUGE),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Socket buffers hold a few MiB at most; the body was never drained.
    let streamed = streamed.load(Ordering::SeqCst);
    if streamed > 64 << 20 {
        bail!("client read {streamed} bytes of a body it should have refused");
    }
    Ok(())
}

#[tokio::test]
async fn invalid_names_are_refused_before_any_request() -> anyhow::Result<()> {
    let requests = counter();
    let seen = requests.clone();
    let server = TestServer::start(|_| {
        Router::new().fallback(move || async move {
            seen.fetch_add(1, Ordering::SeqCst);
            StatusCode::NOT_FOUND
        })
    })
    .await?;
    let upstream = server.client("{}", 0)?;
    let digest = Digest::of(b"x");

    let bad_repo = BlobSource::new(&server.registry, "../../admin");
    let bad_registry = BlobSource::new(format!("{}/v2", server.registry), REPO);
    for src in [&bad_repo, &bad_registry] {
        let err = upstream.blob_size(src, &digest).await;
        assert!(matches!(err, Err(Error::InvalidInput { .. })), "{err:?}");
    }
    let bad_ref = upstream
        .manifest(&server.source(), "latest?x=1", &[], true)
        .await;
    assert!(
        matches!(bad_ref, Err(Error::InvalidInput { .. })),
        "{bad_ref:?}"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = upstream.fetch_range(&server.source(), &digest, 10..5).await;
    assert!(
        matches!(backwards, Err(Error::InvalidInput { .. })),
        "{backwards:?}"
    );
    assert_eq!(hits(&requests), 0);
    Ok(())
}
