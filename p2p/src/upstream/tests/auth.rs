//! The auth handshake against a real server: bearer tokens fetched once and reused, refused
//! credentials, and basic auth from the docker config.

use super::*;

/// A registry that wants `Bearer good-token`, and its token endpoint that wants `user:pw`.
fn bearer_registry(
    base: &str,
    data: Bytes,
    registry_hits: Arc<AtomicUsize>,
    token_hits: Arc<AtomicUsize>,
) -> Router {
    let challenge = format!(
        r#"Bearer realm="{base}/token",service="test-registry",scope="repository:{REPO}:pull""#
    );
    let blob = get(move |headers: HeaderMap| async move {
        registry_hits.fetch_add(1, Ordering::SeqCst);
        if headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v == "Bearer good-token")
        {
            serve_blob(&data, &headers)
        } else {
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, challenge)],
            )
                .into_response()
        }
    });
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("user:pw")
    );
    let token = get(
        move |Query(q): Query<HashMap<String, String>>, headers: HeaderMap| async move {
            token_hits.fetch_add(1, Ordering::SeqCst);
            let scoped = q.get("service").map(String::as_str) == Some("test-registry")
                && q.get("scope").map(String::as_str) == Some("repository:test/blob:pull");
            if !scoped
                || headers
                    .get(header::AUTHORIZATION)
                    .is_none_or(|v| *v != *expected)
            {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            r#"{"token": "good-token", "expires_in": 300}"#.into_response()
        },
    );
    Router::new().route(BLOB_ROUTE, blob).route("/token", token)
}

#[tokio::test]
async fn bearer_token_is_fetched_once_and_reused() -> anyhow::Result<()> {
    let (data, digest) = test_blob();
    let (registry_hits, token_hits) = (counter(), counter());
    let (r, t) = (registry_hits.clone(), token_hits.clone());
    let server = TestServer::start(|base| bearer_registry(base, data.clone(), r, t)).await?;
    let upstream = server.client(&server.login_config("user", "pw"), 0)?;
    let src = server.source();

    assert_eq!(
        upstream.fetch_range(&src, &digest, 0..100).await?,
        data.slice(0..100)
    );
    assert_eq!(
        upstream.fetch_range(&src, &digest, 100..200).await?,
        data.slice(100..200)
    );
    // Clones share the token cache.
    assert_eq!(
        upstream.clone().blob_size(&src, &digest).await?,
        data.len() as u64
    );
    assert_eq!(hits(&token_hits), 1);
    assert_eq!(
        hits(&registry_hits),
        4,
        "one 401, then three authorized requests"
    );
    Ok(())
}

#[tokio::test]
async fn refused_credentials_are_unauthorized_and_not_retried() -> anyhow::Result<()> {
    let (data, digest) = test_blob();
    let (registry_hits, token_hits) = (counter(), counter());
    let (r, t) = (registry_hits.clone(), token_hits.clone());
    let server = TestServer::start(|base| bearer_registry(base, data, r, t)).await?;
    let upstream = server.client(&server.login_config("user", "wrong"), 4)?;

    let err = upstream
        .blob_size(&server.source(), &digest)
        .await
        .err()
        .context("authorized")?;
    assert!(
        matches!(err, Error::Unauthorized { .. }) && !err.is_retryable(),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&server.registry) && msg.contains(REPO) && msg.contains(&digest.to_string()),
        "{msg}"
    );
    assert_eq!((hits(&registry_hits), hits(&token_hits)), (1, 1));
    Ok(())
}

#[tokio::test]
async fn basic_challenge_uses_the_docker_config_login() -> anyhow::Result<()> {
    let (data, digest) = test_blob();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("user:pw")
    );
    let blob = data.clone();
    let server = TestServer::start(|_| {
        Router::new().route(
            BLOB_ROUTE,
            get(move |headers: HeaderMap| async move {
                if headers
                    .get(header::AUTHORIZATION)
                    .is_some_and(|v| *v == *expected)
                {
                    serve_blob(&blob, &headers)
                } else {
                    (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, r#"Basic realm="shoal test""#)],
                    )
                        .into_response()
                }
            }),
        )
    })
    .await?;

    let upstream = server.client(&server.login_config("user", "pw"), 0)?;
    assert_eq!(
        upstream
            .fetch_range(&server.source(), &digest, 5..9)
            .await?,
        data.slice(5..9)
    );

    let anonymous = server.client("{}", 0)?;
    let err = anonymous.fetch_range(&server.source(), &digest, 5..9).await;
    assert!(matches!(err, Err(Error::Unauthorized { .. })), "{err:?}");
    Ok(())
}
