//! The HTTP server (hyper 1.x, HTTP/1.1, optional TLS) and its routes.
//!
//! The token route is the hot path: load the config snapshot, check Basic credentials,
//! parse two query parameters, look up the cache, answer with shared `Bytes`.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::cache::{KeyStatus, Source};
use crate::config::{AccountKind, Config, CredentialSet, OAuthAccount};
use crate::error::{json_response, ServeError};
use crate::metrics::Outcome;
use crate::protocol::{self, parse_query, Proto};
use crate::sidecar::Sidecar;
use crate::state::PersistStatus;

/// Largest request head we read; beyond it the answer is 431.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open keep-alive connections may still send a request after shutdown begins
/// (at most half the grace period).
const MAX_DRAIN: Duration = Duration::from_millis(500);

/// Builds a TLS acceptor from PEM files (ring provider, TLS 1.2 and 1.3).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    // Bounded, non-blocking reads of regular files only (see `files`).
    let read = |path: &Path, what: &str| {
        crate::files::read_limited(path, crate::files::MAX_SECRET_FILE_BYTES, "a TLS file")
            .map_err(|e| format!("cannot read {what} file {}: {e}", path.display()))
    };
    let cert_pem = read(cert, "certificate")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let key_pem = read(key, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("no usable private key in {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not fit: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until shutdown, then lets open requests finish within the grace.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    sidecar: Arc<Sidecar>,
    mut shutdown: watch::Receiver<bool>,
) {
    let options = sidecar.options().clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let max_connections = options.max_connections.max(1);
    let connections = Arc::new(Semaphore::new(max_connections));
    // Set once shutdown begins: every response from then on says `Connection: close`.
    let draining = Arc::new(AtomicBool::new(false));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Over the connection cap: close at once rather than queue.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let sidecar = sidecar.clone();
        let draining = draining.clone();
        let service = service_fn(move |req| {
            let sidecar = sidecar.clone();
            let draining = draining.clone();
            async move {
                let mut resp = route(&sidecar, req).await;
                if draining.load(Ordering::Relaxed) {
                    // hyper closes the connection once this response is written, so the
                    // client learns it must not send another request on it.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let http = http.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    let _ = watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls_stream)) => {
                            let _ = watcher
                                .watch(http.serve_connection(TokioIo::new(tls_stream), service))
                                .await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
    let deadline = tokio::time::Instant::now() + options.shutdown_grace;
    drop(listener);
    draining.store(true, Ordering::Relaxed);
    // Closing an idle keep-alive connection at once races with a request the client is
    // sending on it right then; that request would be reset, never answered. So open
    // connections first get a short drain: each one closes after its next response
    // (which says `Connection: close`), and only the ones still idle after it are closed.
    let drain_until = tokio::time::Instant::now() + MAX_DRAIN.min(options.shutdown_grace / 2);
    while connections.available_permits() < max_connections
        && tokio::time::Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the end of the shutdown grace period");
    }
}

/// Routes one request.
async fn route(sidecar: &Arc<Sidecar>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == sidecar.options().path {
        return token(sidecar, req.method(), req.uri(), req.headers()).await;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if sidecar.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "warming up\n")
            }
        }
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(sidecar.render_metrics())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        p if p == "/v1/accounts" || p.starts_with("/v1/accounts/") => admin(sidecar, &req)
            .await
            .unwrap_or_else(ServeError::into_response),
        _ => ServeError::NotFound.into_response(),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// The EmailEngine token endpoint, on a request's parts (the body is never read).
///
/// Public so the in-process benchmark measures exactly what a request runs.
pub async fn token(
    sidecar: &Arc<Sidecar>,
    method: &Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let mut proto = None;
    let result = answer(sidecar, method, uri, headers, &mut proto).await;
    let (resp, outcome) = match result {
        Ok((body, outcome)) => (json_response(StatusCode::OK, body), outcome),
        Err(e) => {
            let outcome = e.outcome();
            (e.into_response(), outcome)
        }
    };
    sidecar.metrics().request(proto, outcome, started.elapsed());
    resp
}

async fn answer(
    sidecar: &Arc<Sidecar>,
    method: &Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    proto_out: &mut Option<protocol::Proto>,
) -> Result<(Bytes, Outcome), ServeError> {
    if method != Method::GET {
        return Err(ServeError::MethodNotAllowed("GET"));
    }
    let set = {
        // The snapshot guard is dropped before any await.
        let config = sidecar.config();
        if let Some(auth) = &config.auth {
            let header = headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes);
            if !auth.matches(header) {
                wiring::unauthorized(header, uri.query());
                return Err(ServeError::Unauthorized);
            }
        }
        let query = parse_query(uri.query())?;
        *proto_out = query.proto;
        let Some(account) = config.account(&query.account) else {
            wiring::unknown_account(&query.account);
            return Err(ServeError::UnknownAccount);
        };
        match &account.kind {
            AccountKind::Fixed(body) => return Ok((body.clone(), Outcome::Fixed)),
            AccountKind::OAuth(o) => o.set_for(query.proto).clone(),
        }
    };
    let (body, source) = sidecar.cache().get(&set).await?;
    let outcome = match source {
        Source::Hit => Outcome::Hit,
        Source::Joined => Outcome::Joined,
        Source::Miss => Outcome::Miss,
        Source::Stale => Outcome::Stale,
    };
    Ok((body, outcome))
}

/// `/v1/accounts[/{id}[/refresh]]`: status and forced refresh, behind admin credentials.
async fn admin(
    sidecar: &Arc<Sidecar>,
    req: &Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ServeError> {
    let config = sidecar.config().clone();
    if let Some(auth) = &config.admin_auth {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if !auth.matches(header) {
            return Err(ServeError::Unauthorized);
        }
    }
    let rest = req.uri().path().trim_start_matches("/v1/accounts");
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let decode = |s: &str| -> Result<String, ServeError> {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| ServeError::BadRequest(protocol::QueryError::InvalidEncoding("account")))
    };
    let json = |status: StatusCode, v: serde_json::Value| {
        json_response(status, Bytes::from(v.to_string()))
    };
    match (req.method(), segments.as_slice()) {
        (&Method::GET, []) => {
            let status = sidecar.cache().status();
            let mut ids: Vec<&str> = config.accounts.keys().map(|k| &**k).collect();
            ids.sort_unstable();
            let unpersisted = sidecar.token_store().unpersisted();
            let accounts: Vec<_> = ids
                .into_iter()
                .filter_map(|id| {
                    account_json(&config, &status, id).map(|v| with_persist(v, &unpersisted, id))
                })
                .collect();
            Ok(json(
                StatusCode::OK,
                serde_json::json!({ "config": sidecar.reload_status(), "ready": sidecar.is_ready(), "accounts": accounts }),
            ))
        }
        (&Method::GET, [id]) => {
            let id = decode(id)?;
            account_json(&config, &sidecar.cache().status(), &id)
                .map(|v| with_persist(v, &sidecar.token_store().unpersisted(), &id))
                .map(|v| json(StatusCode::OK, v))
                .ok_or(ServeError::UnknownAccount)
        }
        (&Method::POST, [id, "refresh"]) => {
            let id = decode(id)?;
            let account = config.account(&id).ok_or(ServeError::UnknownAccount)?;
            let AccountKind::OAuth(o) = &account.kind else {
                return Ok(json(
                    StatusCode::OK,
                    serde_json::json!({ "id": id, "refreshed": 0, "failed": 0, "credentialSets": [], "note": "fixed accounts have nothing to refresh" }),
                ));
            };
            // The sets in use (tracked by the cache) and the ones pre-warm keeps fresh; a
            // set nobody asked for (say the Graph set of an IMAP-only account) is left
            // alone, as it would be in normal operation.
            let mut sets: Vec<&Arc<CredentialSet>> = o.warm_sets();
            for set in o.sets() {
                if sidecar.cache().is_tracked(&set.key) && !sets.iter().any(|s| s.key == set.key) {
                    sets.push(set);
                }
            }
            let mut results = Vec::with_capacity(sets.len());
            let mut failed = 0;
            for set in sets {
                // Sequential on purpose: sets of one account share its refresh token.
                let outcome = sidecar.cache().force_refresh(set).await;
                let status = sidecar.cache().status();
                let mut v = set_json(o, &status, set);
                v["refreshed"] = serde_json::Value::Bool(outcome.is_ok());
                if let Err(e) = outcome {
                    failed += 1;
                    v["error"] = serde_json::Value::String(e.to_string());
                }
                results.push(v);
            }
            Ok(json(
                if failed == 0 {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_GATEWAY
                },
                serde_json::json!({ "id": id, "refreshed": results.len() - failed, "failed": failed, "credentialSets": results }),
            ))
        }
        (_, [] | [_]) => Err(ServeError::MethodNotAllowed("GET")),
        (_, [_, "refresh"]) => Err(ServeError::MethodNotAllowed("POST")),
        _ => Err(ServeError::NotFound),
    }
}

/// Adds `persist` to an account whose newest refresh token exists only in memory: the
/// OS reason its write failed (or that there is no `--state-dir`), since when, how many
/// writes failed, and when the next is tried. Absent when the token is on disk.
fn with_persist(
    mut v: serde_json::Value,
    unpersisted: &std::collections::HashMap<Arc<str>, PersistStatus>,
    id: &str,
) -> serde_json::Value {
    if let Some(p) = unpersisted.get(id) {
        v["persist"] = serde_json::json!({
            "state": "memory_only",
            "error": p.error,
            "since": humantime::format_rfc3339_seconds(p.since).to_string(),
            "failedWrites": p.attempts,
            "retryInSeconds": p.retry_in.map(|d| d.as_secs()),
        });
    }
    v
}

/// One account for the admin API: every credential set it has, fetched yet or not.
fn account_json(config: &Config, status: &[KeyStatus], id: &str) -> Option<serde_json::Value> {
    let account = config.account(id)?;
    Some(match &account.kind {
        AccountKind::Fixed(_) => {
            serde_json::json!({ "id": id, "type": "fixed", "credentialSets": [] })
        }
        AccountKind::OAuth(o) => {
            let sets: Vec<_> = o
                .sets()
                .into_iter()
                .map(|s| set_json(o, status, s))
                .collect();
            serde_json::json!({ "id": id, "type": "oauth2", "credentialSets": sets })
        }
    })
}

/// A credential set's status (never a token), with the protocols it serves; `idle` when
/// the cache has never been asked for it.
fn set_json(o: &OAuthAccount, status: &[KeyStatus], set: &CredentialSet) -> serde_json::Value {
    let mut protocols: Vec<&str> = Vec::new();
    if o.set_for(None).key == set.key {
        protocols.push("default");
    }
    for p in Proto::ALL {
        if o.set_for(Some(p)).key == set.key {
            protocols.push(p.as_str());
        }
    }
    let found = status.iter().find(|s| {
        *s.account == *set.key.account
            && s.provider == *set.provider_name
            && s.grant == set.grant.as_str()
            && s.scopes == set.scopes
    });
    let mut v = match found.and_then(|s| serde_json::to_value(s).ok()) {
        Some(v) => v,
        None => serde_json::json!({
            "account": &*set.key.account,
            "provider": &*set.provider_name,
            "grant": set.grant.as_str(),
            "scopes": set.scopes,
            "state": "idle",
        }),
    };
    v["protocols"] = serde_json::json!(protocols);
    v
}

/// WARN lines for the two likeliest wiring mistakes, which otherwise show only in a
/// metric: EmailEngine's `authServer` credentials do not match `auth` (often a
/// percent-encoded password, which EmailEngine sends as written), and an account id
/// EmailEngine has that the config does not. At most one line per cause a minute, with the
/// count of the ones held back, so a misconfigured EmailEngine cannot flood the log.
/// The limiters are process-wide: one sidecar runs per process.
mod wiring {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    const EVERY: Duration = Duration::from_secs(60);
    /// Account ids come from the request: bounded before they reach a log line.
    const MAX_ID_CHARS: usize = 128;

    struct Limiter {
        /// Milliseconds since [`epoch`] of the last line logged, plus one (0: never).
        last: AtomicU64,
        held_back: AtomicU64,
    }

    static MISSING: Limiter = Limiter::new();
    static WRONG: Limiter = Limiter::new();
    static UNKNOWN: Limiter = Limiter::new();

    fn epoch() -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    impl Limiter {
        const fn new() -> Self {
            Limiter {
                last: AtomicU64::new(0),
                held_back: AtomicU64::new(0),
            }
        }

        /// `Some(lines held back since the last one)` if a line may be logged now.
        fn admit(&self) -> Option<u64> {
            let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
            self.admit_at(now)
        }

        /// [`Limiter::admit`] at `now_ms` milliseconds since [`epoch`].
        fn admit_at(&self, now_ms: u64) -> Option<u64> {
            let now = now_ms.saturating_add(1);
            let last = self.last.load(Ordering::Relaxed);
            let every = u64::try_from(EVERY.as_millis()).unwrap_or(u64::MAX);
            let due = last == 0 || now.saturating_sub(last) >= every;
            if due
                && self
                    .last
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(self.held_back.swap(0, Ordering::Relaxed));
            }
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// The id as logged: at most [`MAX_ID_CHARS`], control characters (a newline would
    /// forge a log line in the text format) replaced.
    fn bounded(id: &str) -> String {
        id.chars()
            .take(MAX_ID_CHARS)
            .map(|c| if c.is_control() { '\u{fffd}' } else { c })
            .collect()
    }

    /// A 401 on the token endpoint. The credentials are never logged; only whether the
    /// password looks percent-encoded.
    pub(super) fn unauthorized(header: Option<&[u8]>, query: Option<&str>) {
        let (limiter, missing) = match header {
            None => (&MISSING, true),
            Some(_) => (&WRONG, false),
        };
        let Some(held_back) = limiter.admit() else {
            return;
        };
        let account = crate::protocol::parse_query(query)
            .map(|q| bounded(&q.account))
            .unwrap_or_default();
        if missing {
            tracing::warn!(
                account = %account,
                held_back,
                "token request without Basic credentials (401): put the user and password of the sidecar's `auth` into EmailEngine's authServer URL (http://USER:PASSWORD@127.0.0.1:8080/authentication)"
            );
        } else {
            let percent_encoded = header
                .and_then(crate::protocol::decode_basic)
                .is_some_and(|pair| pair.contains(&b'%'));
            tracing::warn!(
                account = %account,
                percent_encoded,
                held_back,
                "token request with wrong Basic credentials (401): EmailEngine's authServer URL must carry the user and password of the sidecar's `auth`, byte for byte; EmailEngine does not percent-decode them, so use only A-Z a-z 0-9 - . _ ~"
            );
        }
    }

    /// A 404 for an account id the config does not have.
    pub(super) fn unknown_account(id: &str) {
        let Some(held_back) = UNKNOWN.admit() else {
            return;
        };
        tracing::warn!(
            account = %bounded(id),
            held_back,
            "token request for an account id not in the config (404): register the account in EmailEngine with the same account id as in the sidecar's `accounts` (ids are case-sensitive), or add it to the config"
        );
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn one_line_per_window_then_the_count_held_back() {
            let l = Limiter::new();
            assert_eq!(l.admit_at(0), Some(0));
            assert_eq!(l.admit_at(1), None);
            assert_eq!(l.admit_at(59_999), None);
            assert_eq!(l.admit_at(60_000), Some(2));
            assert_eq!(l.admit_at(60_001), None);
            assert_eq!(l.admit_at(200_000), Some(1));
        }

        #[test]
        fn ids_are_bounded_on_a_char_boundary() {
            let long = "é".repeat(300);
            assert_eq!(bounded(&long).chars().count(), MAX_ID_CHARS);
            assert_eq!(bounded("alice"), "alice");
            assert_eq!(bounded("a\nINFO forged"), "a\u{fffd}INFO forged");
        }
    }
}
