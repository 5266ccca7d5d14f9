//! Manifest HEAD and GET, as the registry mirror uses them.

use super::*;

#[tokio::test]
async fn manifests_by_tag_and_digest() -> anyhow::Result<()> {
    const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
    let manifest = Bytes::from_static(
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
    );
    let digest = Digest::of(&manifest);
    let body = manifest.clone();
    let server = TestServer::start(|_| {
        let tagged = get(move |headers: HeaderMap| async move {
            let accepts = headers
                .get_all(header::ACCEPT)
                .iter()
                .any(|v| v == MEDIA_TYPE);
            if !accepts {
                return StatusCode::NOT_FOUND.into_response();
            }
            let headers = [
                (header::CONTENT_TYPE, MEDIA_TYPE.to_owned()),
                (header::CONTENT_LENGTH, body.len().to_string()),
            ];
            (
                headers,
                [(DIGEST_HEADER, Digest::of(&body).to_string())],
                body,
            )
                .into_response()
        });
        let tampered = get(|| async { "{}" });
        let huge = get(|| async { vec![b' '; 5 << 20] });
        Router::new()
            .route("/v2/test/blob/manifests/latest", tagged.clone())
            .route(&format!("/v2/test/blob/manifests/{digest}"), tagged)
            .route(
                &format!("/v2/test/blob/manifests/{}", Digest::of(b"other")),
                tampered,
            )
            .route("/v2/test/blob/manifests/huge", huge)
    })
    .await?;
    let upstream = server.client("{}", 0)?;
    let src = server.source();
    let accept = [MEDIA_TYPE.to_owned()];

    let got = upstream.manifest(&src, "latest", &accept, false).await?;
    assert_eq!((got.status, got.body.clone()), (200, manifest.clone()));
    assert_eq!(got.content_type.as_deref(), Some(MEDIA_TYPE));
    assert_eq!(got.docker_content_digest, Some(digest.to_string()));

    let head = upstream
        .manifest(&src, &digest.to_string(), &[], true)
        .await?;
    assert_eq!(
        (head.content_length, head.body.len()),
        (Some(manifest.len() as u64), 0)
    );

    let wrong = upstream
        .manifest(&src, &Digest::of(b"other").to_string(), &accept, false)
        .await;
    assert!(matches!(wrong, Err(Error::BadResponse { .. })), "{wrong:?}");
    let huge = upstream.manifest(&src, "huge", &accept, false).await;
    assert!(matches!(huge, Err(Error::TooLarge { .. })), "{huge:?}");
    let missing = upstream
        .manifest(&src, "latest", &["text/plain".to_owned()], false)
        .await;
    assert!(
        missing.as_ref().is_err_and(Error::is_not_found),
        "{missing:?}"
    );
    Ok(())
}
