//! The write side against an in-memory registry: monolithic uploads through relative and
//! absolute `Location`s that carry their own query, cross-repository mounts, a PUT that fails
//! once and is retried from a new session, manifests, whole-blob downloads to a file, and a
//! bearer registry that wants `push,pull` scope for uploads.

use std::sync::Mutex;

use axum::extract::{Path as UrlPath, State};
use axum::routing::{post, put};

use super::*;

const UPLOADS_ROUTE: &str = "/v2/test/blob/blobs/uploads/";

/// What the fake registry holds and how it behaves.
#[derive(Default)]
struct Store {
    blobs: Mutex<HashMap<String, Bytes>>,
    manifests: Mutex<HashMap<String, (String, Bytes)>>,
    /// Answer `POST` with an absolute `Location` (else a path).
    absolute: bool,
    /// `PUT`s of blobs to fail with 503 before one succeeds.
    failing_puts: AtomicUsize,
    sessions: AtomicUsize,
    /// Bearer auth: reads need a token, writes a token with push scope.
    bearer: bool,
    tokens: AtomicUsize,
}

type Shared = Arc<(Store, String)>;

/// The 401 to answer unless the request carries a good enough token.
fn denied(shared: &Shared, headers: &HeaderMap, write: bool) -> Option<Response> {
    let (store, base) = &**shared;
    if !store.bearer {
        return None;
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let ok = match token {
        "Bearer push-token" => true,
        "Bearer pull-token" => !write,
        _ => false,
    };
    if ok {
        return None;
    }
    let scope = if write { "pull,push" } else { "pull" };
    let challenge =
        format!(r#"Bearer realm="{base}/token",service="test",scope="repository:{REPO}:{scope}""#);
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
        )
            .into_response(),
    )
}

fn fake_registry(base: &str, store: Store) -> (Router, Shared) {
    let shared: Shared = Arc::new((store, base.to_owned()));
    let router = Router::new()
        .route(UPLOADS_ROUTE, post(start_upload))
        .route("/v2/test/blob/blobs/uploads/{id}", put(finish_upload))
        .route(BLOB_ROUTE, get(get_blob))
        .route("/v2/test/blob/manifests/{reference}", put(put_manifest))
        .route("/token", get(token))
        .with_state(shared.clone());
    (router, shared)
}

async fn start_upload(
    State(shared): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = denied(&shared, &headers, true) {
        return denied;
    }
    let (store, base) = &*shared;
    if let (Some(digest), Some(_from)) = (q.get("mount"), q.get("from"))
        && store.blobs.lock().is_ok_and(|b| b.contains_key(digest))
    {
        return StatusCode::CREATED.into_response();
    }
    let id = store.sessions.fetch_add(1, Ordering::SeqCst);
    let path = format!("{UPLOADS_ROUTE}{id}?_state=s{id}");
    let location = if store.absolute {
        format!("{base}{path}")
    } else {
        path
    };
    (StatusCode::ACCEPTED, [(header::LOCATION, location)]).into_response()
}

async fn finish_upload(
    State(shared): State<Shared>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = denied(&shared, &headers, true) {
        return denied;
    }
    let store = &shared.0;
    if q.get("_state") != Some(&format!("s{id}")) {
        return (StatusCode::BAD_REQUEST, "lost the session state").into_response();
    }
    if store
        .failing_puts
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let digest = Digest::of(&body).to_string();
    if q.get("digest") != Some(&digest) {
        return (StatusCode::BAD_REQUEST, "DIGEST_INVALID").into_response();
    }
    if let Ok(mut blobs) = store.blobs.lock() {
        blobs.insert(digest.clone(), body);
    }
    (StatusCode::CREATED, [(DIGEST_HEADER, digest)]).into_response()
}

async fn get_blob(
    State(shared): State<Shared>,
    UrlPath(digest): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = denied(&shared, &headers, false) {
        return denied;
    }
    let blob = shared
        .0
        .blobs
        .lock()
        .ok()
        .and_then(|b| b.get(&digest).cloned());
    match blob {
        Some(data) => serve_blob(&data, &headers),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn put_manifest(
    State(shared): State<Shared>,
    UrlPath(reference): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(denied) = denied(&shared, &headers, true) {
        return denied;
    }
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let digest = Digest::of(&body).to_string();
    if let Ok(mut manifests) = shared.0.manifests.lock() {
        manifests.insert(reference, (media_type, body));
    }
    (StatusCode::CREATED, [(DIGEST_HEADER, digest)]).into_response()
}

async fn token(State(shared): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    shared.0.tokens.fetch_add(1, Ordering::SeqCst);
    let token = match q.get("scope").map(String::as_str) {
        Some(s) if s == format!("repository:{REPO}:pull,push") => "push-token",
        Some(s) if s == format!("repository:{REPO}:pull") => "pull-token",
        _ => return StatusCode::UNAUTHORIZED.into_response(),
    };
    format!(r#"{{"token": "{token}"}}"#).into_response()
}

fn stored(shared: &Shared, digest: &Digest) -> Option<Bytes> {
    shared
        .0
        .blobs
        .lock()
        .ok()?
        .get(&digest.to_string())
        .cloned()
}

#[tokio::test]
async fn uploads_a_file_through_relative_and_absolute_locations() -> anyhow::Result<()> {
    for absolute in [false, true] {
        let mut shared = None;
        let server = TestServer::start(|base| {
            let (router, s) = fake_registry(
                base,
                Store {
                    absolute,
                    ..Store::default()
                },
            );
            shared = Some(s);
            router
        })
        .await?;
        let shared = shared.context("no store")?;
        let upstream = server.client("{}", 0)?;
        let src = server.source();
        let (data, digest) = test_blob();
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("blob");
        std::fs::write(&path, &data)?;

        assert!(!upstream.blob_exists(&src, &digest).await?);
        let sent = Arc::new(AtomicU64::new(0));
        let seen = sent.clone();
        let body = BlobBody::File {
            path: path.clone(),
            progress: Some(Arc::new(move |n| seen.store(n, Ordering::SeqCst))),
        };
        upstream
            .push_blob(&src, &digest, data.len() as u64, body)
            .await?;
        assert_eq!(
            stored(&shared, &digest),
            Some(data.clone()),
            "absolute={absolute}"
        );
        assert_eq!(sent.load(Ordering::SeqCst), data.len() as u64);
        assert!(upstream.blob_exists(&src, &digest).await?);

        // Mounting a blob the registry has moves no bytes and opens no session.
        let sessions = shared.0.sessions.load(Ordering::SeqCst);
        assert!(upstream.mount_blob(&src, &digest, "other/repo").await?);
        assert_eq!(shared.0.sessions.load(Ordering::SeqCst), sessions);
        // One it lacks is declined, and the session it opens is left to expire.
        assert!(
            !upstream
                .mount_blob(&src, &Digest::of(b"x"), "other/repo")
                .await?
        );
        assert_eq!(shared.0.sessions.load(Ordering::SeqCst), sessions + 1);
    }
    Ok(())
}

#[tokio::test]
async fn a_failed_put_is_retried_from_a_new_session() -> anyhow::Result<()> {
    let mut shared = None;
    let server = TestServer::start(|base| {
        let store = Store {
            failing_puts: AtomicUsize::new(2),
            ..Store::default()
        };
        let (router, s) = fake_registry(base, store);
        shared = Some(s);
        router
    })
    .await?;
    let shared = shared.context("no store")?;
    let (data, digest) = test_blob();
    let body = BlobBody::Bytes(data.clone());
    let size = data.len() as u64;

    let impatient = server.client("{}", 1)?;
    let err = impatient
        .push_blob(&server.source(), &digest, size, body.clone())
        .await;
    assert!(
        matches!(err, Err(Error::Status { status: 503, .. })),
        "{err:?}"
    );

    let patient = server.client("{}", 4)?;
    patient
        .push_blob(&server.source(), &digest, size, body)
        .await?;
    assert_eq!(stored(&shared, &digest), Some(data));
    assert_eq!(shared.0.sessions.load(Ordering::SeqCst), 3);
    Ok(())
}

#[tokio::test]
async fn wrong_bodies_are_refused_before_any_request() -> anyhow::Result<()> {
    let mut shared = None;
    let server = TestServer::start(|base| {
        let (router, s) = fake_registry(base, Store::default());
        shared = Some(s);
        router
    })
    .await?;
    let shared = shared.context("no store")?;
    let upstream = server.client("{}", 0)?;
    let (data, digest) = test_blob();
    let src = server.source();

    let short = data.slice(1..);
    let wrong_size = upstream
        .push_blob(&src, &digest, data.len() as u64, BlobBody::Bytes(short))
        .await;
    let other = Digest::of(b"other");
    let wrong_digest = upstream
        .push_blob(&src, &other, data.len() as u64, BlobBody::Bytes(data))
        .await;
    let wrong_ref = upstream
        .push_manifest(&src, &other.to_string(), "application/json", Bytes::new())
        .await;
    for err in [wrong_size.err(), wrong_digest.err(), wrong_ref.err()] {
        assert!(matches!(err, Some(Error::InvalidInput { .. })), "{err:?}");
    }
    assert_eq!(shared.0.sessions.load(Ordering::SeqCst), 0);
    Ok(())
}

#[tokio::test]
async fn manifests_are_put_with_their_media_type() -> anyhow::Result<()> {
    const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
    let mut shared = None;
    let server = TestServer::start(|base| {
        let (router, s) = fake_registry(base, Store::default());
        shared = Some(s);
        router
    })
    .await?;
    let shared = shared.context("no store")?;
    let upstream = server.client("{}", 0)?;
    let body = Bytes::from_static(br#"{"schemaVersion":2}"#);

    let digest = upstream
        .push_manifest(&server.source(), "v1", MEDIA_TYPE, body.clone())
        .await?;
    assert_eq!(digest, Digest::of(&body));
    let by_digest = upstream
        .push_manifest(
            &server.source(),
            &digest.to_string(),
            MEDIA_TYPE,
            body.clone(),
        )
        .await?;
    assert_eq!(by_digest, digest);
    let manifests = shared
        .0
        .manifests
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    assert_eq!(
        manifests.get("v1"),
        Some(&(MEDIA_TYPE.to_owned(), body.clone()))
    );
    assert!(manifests.contains_key(&digest.to_string()));
    Ok(())
}

#[tokio::test]
async fn downloads_a_whole_blob_into_a_file_and_checks_it() -> anyhow::Result<()> {
    let (data, digest) = test_blob();
    let blob = data.clone();
    let server = TestServer::start(|_| {
        Router::new()
            .route(
                BLOB_ROUTE,
                get(move |headers: HeaderMap| async move { serve_blob(&blob, &headers) }),
            )
            .route(
                &format!("/v2/test/blob/blobs/{}", Digest::of(b"liar")),
                get(|| async { "not the bytes you want" }),
            )
    })
    .await?;
    let upstream = server.client("{}", 0)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("blob");

    let got = Arc::new(AtomicU64::new(0));
    let seen = got.clone();
    let progress: OnProgress = Arc::new(move |n| seen.store(n, Ordering::SeqCst));
    let size = upstream
        .fetch_blob_to(&server.source(), &digest, &path, Some(progress))
        .await?;
    assert_eq!(size, data.len() as u64);
    assert_eq!(got.load(Ordering::SeqCst), size);
    assert_eq!(std::fs::read(&path)?, data);

    let liar = upstream
        .fetch_blob_to(&server.source(), &Digest::of(b"liar"), &path, None)
        .await;
    assert!(matches!(liar, Err(Error::BadResponse { .. })), "{liar:?}");
    Ok(())
}

#[tokio::test]
async fn bearer_registry_gets_a_push_token_for_uploads() -> anyhow::Result<()> {
    let mut shared = None;
    let server = TestServer::start(|base| {
        let store = Store {
            bearer: true,
            ..Store::default()
        };
        let (router, s) = fake_registry(base, store);
        shared = Some(s);
        router
    })
    .await?;
    let shared = shared.context("no store")?;
    let upstream = server.client("{}", 0)?;
    let src = server.source();
    let (data, digest) = test_blob();

    // A pull token first, as convert checks for the blob before uploading it.
    assert!(!upstream.blob_exists(&src, &digest).await?);
    let body = BlobBody::Bytes(data.clone());
    upstream
        .push_blob(&src, &digest, data.len() as u64, body)
        .await?;
    upstream
        .push_manifest(&src, "v1", "application/json", Bytes::from_static(b"{}"))
        .await?;
    assert!(upstream.blob_exists(&src, &digest).await?);
    assert_eq!(stored(&shared, &digest), Some(data));
    assert_eq!(
        shared.0.tokens.load(Ordering::SeqCst),
        2,
        "one pull, one push token"
    );
    Ok(())
}
