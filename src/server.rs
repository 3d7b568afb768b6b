//! The HTTP server (hyper 1.x, HTTP/1.1, optional TLS) and its routes.
//!
//! The token route is the hot path: load the config snapshot, check Basic credentials,
//! parse two query parameters, look up the cache, answer with shared `Bytes`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::cache::schedule::later;
use crate::cache::{CacheError, KeyEntry, Source, TokenCache};
use crate::config::{AccountKind, Config, CredentialSet, OAuthAccount};
use crate::connections::{Conn, Registry};
use crate::error::{json_response, ServeError};
use crate::metrics::Outcome;
use crate::protocol::{self, parse_query, Proto};
use crate::shared::{Route, Sidecar};
use crate::state::{PersistStatus, TokenStore};
use crate::status::KeyStatus;

/// Largest request head we read; beyond it the answer is 431.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open keep-alive connections may still send a request after shutdown begins
/// (at most half the grace period).
const MAX_DRAIN: Duration = Duration::from_millis(500);

/// Why the TLS certificate and key cannot be used: which file, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (`what`: certificate or key).
    #[error("cannot read {what} file {}: {source}", .path.display())]
    Read {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: crate::files::ReadError,
    },
    /// The certificate file holds a malformed PEM section.
    #[error("bad certificate in {}: {source}", .path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate in {}", .0.display())]
    NoCertificate(PathBuf),
    /// The key file holds no private key rustls can use.
    #[error("no usable private key in {}: {source}", .path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the configuration.
    #[error("{0}")]
    Config(rustls::Error),
    /// The key is not the certificate's.
    #[error("certificate and key do not fit: {0}")]
    Mismatch(rustls::Error),
}

/// Builds a TLS acceptor from PEM files (ring provider, TLS 1.2 and 1.3).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    // Bounded, non-blocking reads of regular files only (see `files`).
    let read = |path: &Path, what: &'static str| {
        crate::files::read_limited(path, crate::files::MAX_SECRET_FILE_BYTES, "a TLS file").map_err(
            |source| TlsError::Read {
                what,
                path: path.to_owned(),
                source,
            },
        )
    };
    let cert_pem = read(cert, "certificate")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::BadCertificate {
            path: cert.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key_pem = read(key, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::BadKey {
        path: key.to_owned(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Mismatch)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until shutdown, then lets open requests finish within the grace.
///
/// At most `max_connections` are open at once (the cap [`crate::limits`] allows); at the
/// cap the connection idle the longest is closed to admit a new one.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    sidecar: Arc<Sidecar>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let options = sidecar.options().clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let registry = Registry::new(max_connections);
    let idle_timeout = options.idle_timeout;
    // Set once shutdown begins: every response from then on says `Connection: close`.
    let draining = Arc::new(AtomicBool::new(false));
    let mut accept_errors = AcceptErrors::default();
    // The operator page's CSRF key and sign-ins: this server's.
    let ui = Arc::new(crate::ui::Ui::new());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually EMFILE: free a descriptor if an idle client holds one, and
                    // back off briefly instead of spinning.
                    accept_errors.failed(&e);
                    registry.close_longest_idle();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Some(admitted) = registry.admit().await else {
            // Every connection has a request in progress: close at once rather than queue.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let sidecar = sidecar.clone();
        let draining = draining.clone();
        let ui = ui.clone();
        let conn = admitted.conn().clone();
        let service = service_fn(move |req| {
            let sidecar = sidecar.clone();
            let draining = draining.clone();
            let ui = ui.clone();
            let in_request = conn.request();
            async move {
                let mut resp = route(&sidecar, &ui, req).await;
                if resp.status() != StatusCode::UNAUTHORIZED {
                    in_request.trust();
                }
                drop(in_request);
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
        let tls = tls.clone();
        tokio::spawn(async move {
            let conn = admitted.conn().clone();
            match tls {
                None => {
                    drive(
                        http.serve_connection(TokioIo::new(stream), service),
                        &conn,
                        idle_timeout,
                    )
                    .await
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let tls_stream = tokio::select! {
                        r = handshake => r,
                        () = conn.close_requested() => return,
                        () = conn.idle_for(idle_timeout) => return,
                    };
                    match tls_stream {
                        Ok(Ok(tls_stream)) => {
                            drive(
                                http.serve_connection(TokioIo::new(tls_stream), service),
                                &conn,
                                idle_timeout,
                            )
                            .await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop(admitted);
        });
    }
    let deadline = later(tokio::time::Instant::now(), options.shutdown_grace);
    drop(listener);
    draining.store(true, Ordering::Relaxed);
    // Closing an idle keep-alive connection at once races with a request the client is
    // sending on it right then; that request would be reset, never answered. So open
    // connections first get a short drain: each one closes after its next response
    // (which says `Connection: close`), and only the ones still idle after it are closed.
    let drain_until = later(
        tokio::time::Instant::now(),
        MAX_DRAIN.min(options.shutdown_grace / 2),
    );
    while registry.open() > 0 && tokio::time::Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    registry.close_all();
    while registry.open() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("connections still open at the end of the shutdown grace period");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs one connection until it ends; when it is asked to close (cap reached, shutdown)
/// or has been idle for `idle_timeout`, it closes once its request in progress, if any,
/// is answered.
async fn drive<I, S>(
    connection: hyper::server::conn::http1::Connection<I, S>,
    conn: &Conn,
    idle_timeout: Duration,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = conn.close_requested() => {}
        () = conn.idle_for(idle_timeout) => {}
    }
    connection.as_mut().graceful_shutdown();
    // hyper closes at once only a connection that is idle between requests or has sent
    // nothing; one with part of a request head stays open until the header-read timeout
    // (30 s), keeping its slot: a way to lock EmailEngine out. So unless a request is in
    // progress (it is answered first), the connection is dropped after a short wait.
    loop {
        match tokio::time::timeout(CLOSE_WAIT, connection.as_mut()).await {
            Ok(_) => return,
            Err(_) if conn.is_busy() => {}
            Err(_) => return,
        }
    }
}

/// How long a connection asked to close, with no request in progress, may take to do so
/// before it is dropped (within `connections::EVICT_WAIT`, which a new client waits for
/// its slot).
const CLOSE_WAIT: Duration = Duration::from_millis(40);

/// Accept errors, logged at most once per [`ACCEPT_ERROR_LOG_INTERVAL`] with a count of
/// the ones not logged: out of descriptors, accept fails again at once, many times a second.
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<Instant>,
    unlogged: u64,
}

/// See [`AcceptErrors`].
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl AcceptErrors {
    fn failed(&mut self, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|t| now.saturating_duration_since(t) < ACCEPT_ERROR_LOG_INTERVAL)
        {
            self.unlogged = self.unlogged.saturating_add(1);
            return;
        }
        tracing::warn!(error = %e, not_logged_since_last = self.unlogged, "accept failed (logged at most every 10 s)");
        self.last_logged = Some(now);
        self.unlogged = 0;
    }
}

/// Routes one request.
async fn route(
    sidecar: &Arc<Sidecar>,
    ui: &Arc<crate::ui::Ui>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
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
            let health = sidecar.token_store().health();
            let down_for = health
                .unreachable_since
                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            sidecar.metrics.state_store(health.reachable, down_for);
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
        p if p == "/ui" || p.starts_with("/ui/") => {
            crate::ui::handle(sidecar, ui, req, |s, q| Box::pin(admin_list(s, q))).await
        }
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
    let (entry, account, proto) = {
        // The snapshot guard is dropped before any await.
        let routes = sidecar.routes();
        if let Some(auth) = &routes.config().auth {
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
        let Some(route) = routes.route(&query.account) else {
            wiring::unknown_account(&query.account);
            return Err(ServeError::UnknownAccount);
        };
        match route {
            Route::Fixed(body) => return Ok((Bytes::clone(body), Outcome::Fixed)),
            Route::OAuth(entries) => {
                let entry = entries.get(query.proto);
                if let Some(body) = sidecar.cache().hit(entry) {
                    return Ok((body, Outcome::Hit));
                }
                (entry.clone(), query.account, query.proto)
            }
        }
    };
    let (body, source) = match sidecar.cache().get(&entry).await {
        // The key was removed or got new credentials after this request read the routes:
        // the routes in use now say what serves it.
        Err(CacheError::Superseded) => {
            let entry = match sidecar.routes().route(&account) {
                // Removed: answered for the account it asked about; the client's next
                // request learns it is gone.
                None => return Err(CacheError::Superseded.into()),
                Some(Route::Fixed(body)) => return Ok((Bytes::clone(body), Outcome::Fixed)),
                Some(Route::OAuth(entries)) => entries.get(proto).clone(),
            };
            sidecar.cache().get(&entry).await?
        }
        other => other?,
    };
    let outcome = match source {
        Source::Hit => Outcome::Hit,
        Source::Joined => Outcome::Joined,
        Source::Miss => Outcome::Miss,
        Source::Stale => Outcome::Stale,
    };
    Ok((body, outcome))
}

/// `/v1/accounts[/{id}[/refresh]]`: status and forced refresh, behind admin credentials;
/// closed when the config has none.
async fn admin(
    sidecar: &Arc<Sidecar>,
    req: &Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ServeError> {
    let config = sidecar.config().clone();
    let Some(auth) = &config.admin_auth else {
        return Err(ServeError::AdminClosed);
    };
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if !auth.matches(header) {
        return Err(ServeError::Unauthorized);
    }
    let rest = req.uri().path().trim_start_matches("/v1/accounts");
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let decode = |s: &str| -> Result<String, ServeError> {
        Ok(protocol::percent_decode_strict(s, "account")?.into_owned())
    };
    let json = |status: StatusCode, v: serde_json::Value| {
        json_response(status, Bytes::from(v.to_string()))
    };
    match (req.method(), segments.as_slice()) {
        (&Method::GET, []) => {
            let query = req.uri().query().unwrap_or("").to_owned();
            let body = admin_list(sidecar.clone(), query).await?;
            Ok(json_response(StatusCode::OK, body))
        }
        (&Method::GET, [id]) => {
            let id = decode(id)?;
            let account = config.account(&id).ok_or(ServeError::UnknownAccount)?;
            let view = account_view(sidecar.cache(), sidecar.token_store(), &id, account);
            Ok(json_response(StatusCode::OK, to_json_bytes(&view)))
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
            let route = sidecar
                .routes()
                .route(&id)
                .cloned()
                .ok_or(ServeError::UnknownAccount)?;
            let mut sets: Vec<&Arc<CredentialSet>> = o.warm_sets();
            for set in o.sets() {
                if sidecar.cache().is_tracked(&set.key) && !sets.iter().any(|s| s.key == set.key) {
                    sets.push(set);
                }
            }
            let entries: Vec<Arc<KeyEntry>> = sets
                .iter()
                .filter_map(|set| route.entry_of(&set.key).cloned())
                .collect();
            // A forced refresh ignores back-off, so it is the one way to make the sidecar
            // call a provider at will: at most one new call per set per interval.
            let interval = sidecar.options().forced_refresh_interval;
            if let Some(wait) = sidecar.cache().forced_refresh_wait(&entries, interval) {
                return Err(ServeError::RefreshRateLimited(wait));
            }
            let mut results = Vec::with_capacity(entries.len());
            let mut failed = 0;
            for entry in &entries {
                // Sequential on purpose: sets of one account share its refresh token.
                let outcome = sidecar.cache().force_refresh(entry).await;
                let mut v = serde_json::to_value(set_view(o, entry.status(), entry.set()))
                    .unwrap_or(serde_json::Value::Null);
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

/// `GET /v1/accounts?<query>`'s body (also the operator page's data).
///
/// Sorting and rendering every account is proportional to the map (100k accounts: tens
/// of MB of JSON): done on a thread of its own at nice +10, as reloads are
/// (BENCHMARKS.md, item 8). It takes each key's lock for a moment, which a hit never
/// takes: starved, it delays no request served from memory.
async fn admin_list(sidecar: Arc<Sidecar>, query: String) -> Result<Bytes, ServeError> {
    let page = Page::parse(Some(&query))?;
    let config = sidecar.config();
    let building = sidecar.list_build().ok_or(ServeError::ListBusy)?;
    let (done, rendered) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ee-admin-list".into())
        .spawn(move || {
            crate::priority::lower_this_threads_priority();
            let body = list(&sidecar, &config, &page);
            // Free before answering: a client's next list must find the place.
            drop(building);
            let _ = done.send(body);
        })
        .map_err(|_| ServeError::ListFailed)?;
    rendered.await.map_err(|_| ServeError::ListFailed)
}

/// The largest `limit` the admin list takes.
const MAX_LIMIT: usize = 1_000_000;

/// `GET /v1/accounts?limit=&offset=&state=`: a page of the accounts sorted by id, and
/// optionally only those with a credential set in `state`.
struct Page {
    limit: usize,
    offset: usize,
    state: Option<&'static str>,
}

/// The values `state=` takes.
const STATES: [&str; 6] = [
    "ok",
    "refreshing",
    "failing_transient",
    "failed_permanent",
    "needs_consent",
    "idle",
];

impl Page {
    fn parse(query: Option<&str>) -> Result<Page, ServeError> {
        let mut page = Page {
            limit: MAX_LIMIT,
            offset: 0,
            state: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "limit" => {
                    page.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or(ServeError::InvalidParameter {
                            name: "limit",
                            expected: "a whole number from 1 to 1000000",
                        })?;
                }
                "offset" => {
                    page.offset = value.parse().map_err(|_| ServeError::InvalidParameter {
                        name: "offset",
                        expected: "a whole number, 0 or more",
                    })?;
                }
                "state" => {
                    page.state = Some(STATES.into_iter().find(|s| *s == value).ok_or(
                        ServeError::InvalidParameter {
                            name: "state",
                            expected:
                                "one of ok, refreshing, failing_transient, failed_permanent, needs_consent, idle",
                        },
                    )?);
                }
                _ => {}
            }
        }
        Ok(page)
    }
}

/// Renders the admin list (on a thread of its own; see the caller).
fn list(sidecar: &Sidecar, config: &Config, page: &Page) -> Bytes {
    let mut ids: Vec<&Arc<str>> = config.accounts.keys().collect();
    ids.sort_unstable();
    let end = page.offset.saturating_add(page.limit);
    // Without a filter, only the page's accounts need their status.
    let candidates: &[&Arc<str>] = match page.state {
        None => ids
            .get(page.offset.min(ids.len())..end.min(ids.len()))
            .unwrap_or(&[]),
        Some(_) => &ids,
    };
    let mut matched = 0usize;
    let mut shown = Vec::new();
    for id in candidates {
        let Some(account) = config.account(id) else {
            continue;
        };
        let view = account_view(sidecar.cache(), sidecar.token_store(), id, account);
        if let Some(state) = page.state {
            if !view.credential_sets.iter().any(|s| s.state() == state) {
                continue;
            }
            matched += 1;
            if matched <= page.offset || matched > end {
                continue;
            }
        }
        shown.push(view);
    }
    let total = if page.state.is_some() {
        matched
    } else {
        ids.len()
    };
    let mut out = Vec::with_capacity(256 + shown.len() * 512);
    out.extend_from_slice(b"{\"config\":");
    let _ = serde_json::to_writer(&mut out, &sidecar.reload_status());
    out.extend_from_slice(b",\"stateStore\":");
    let _ = serde_json::to_writer(&mut out, &StoreView::from(sidecar.token_store().health()));
    out.extend_from_slice(if sidecar.is_ready() {
        b",\"ready\":true,\"accounts\":"
    } else {
        b",\"ready\":false,\"accounts\":"
    });
    let _ = serde_json::to_writer(&mut out, &shown);
    out.extend_from_slice(format!(",\"total\":{total},\"offset\":{}", page.offset).as_bytes());
    if end < total {
        out.extend_from_slice(format!(",\"nextOffset\":{end}").as_bytes());
    }
    out.push(b'}');
    Bytes::from(out)
}

/// One account for the admin API: every credential set it has, fetched yet or not.
fn account_view<'a>(
    cache: &TokenCache,
    store: &TokenStore,
    id: &'a str,
    account: &'a crate::config::Account,
) -> AccountView<'a> {
    match &account.kind {
        AccountKind::Fixed(_) => AccountView {
            id,
            kind: "fixed",
            credential_sets: Vec::new(),
            persist: None,
        },
        AccountKind::OAuth(o) => AccountView {
            id,
            kind: "oauth2",
            credential_sets: o
                .sets()
                .into_iter()
                .map(|set| set_view(o, cache.status_of(set), set))
                .collect(),
            persist: store.persist_status(id).map(PersistView::from),
        },
    }
}

fn to_json_bytes<T: serde::Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// The state store's health as the admin API shows it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StoreView {
    backend: &'static str,
    location: String,
    encrypted: bool,
    reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    unreachable_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unreachable_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<crate::state::StoreHealth> for StoreView {
    fn from(h: crate::state::StoreHealth) -> Self {
        StoreView {
            backend: h.backend,
            location: h.location,
            encrypted: h.encrypted,
            reachable: h.reachable,
            unreachable_since: h
                .unreachable_since
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            unreachable_seconds: h.unreachable_since.map(|t| {
                std::time::SystemTime::now()
                    .duration_since(t)
                    .unwrap_or_default()
                    .as_secs()
            }),
            error: h.error,
        }
    }
}

/// An account as the admin API shows it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct AccountView<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    credential_sets: Vec<SetView<'a>>,
    /// Present while the account's newest refresh token exists only in memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    persist: Option<PersistView>,
}

/// Why an account's newest refresh token is not on disk yet: the OS reason of the last
/// failed write (or that there is no `--state-dir`), since when, how many writes failed,
/// and when the next is tried.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct PersistView {
    state: &'static str,
    error: String,
    since: String,
    failed_writes: u32,
    retry_in_seconds: Option<u64>,
}

impl From<PersistStatus> for PersistView {
    fn from(p: PersistStatus) -> Self {
        PersistView {
            state: p.state,
            error: p.error,
            since: humantime::format_rfc3339_seconds(p.since).to_string(),
            failed_writes: p.attempts,
            retry_in_seconds: p.retry_in.map(|d| d.as_secs()),
        }
    }
}

/// A credential set's status (never a token), with the protocols it serves.
#[derive(serde::Serialize)]
struct SetView<'a> {
    #[serde(flatten)]
    status: SetStatus<'a>,
    protocols: Vec<&'static str>,
}

impl SetView<'_> {
    fn state(&self) -> &'static str {
        match &self.status {
            SetStatus::Tracked(s) => s.state,
            SetStatus::Idle { state, .. } => state,
        }
    }
}

/// A tracked set's full status, or `idle` when the cache has never been asked for it.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum SetStatus<'a> {
    Tracked(Box<KeyStatus>),
    Idle {
        account: &'a str,
        provider: &'a str,
        grant: &'static str,
        scopes: &'a [String],
        state: &'static str,
    },
}

fn set_view<'a>(
    o: &OAuthAccount,
    status: Option<KeyStatus>,
    set: &'a CredentialSet,
) -> SetView<'a> {
    let mut protocols: Vec<&'static str> = Vec::new();
    if o.set_for(None).key == set.key {
        protocols.push("default");
    }
    for p in Proto::ALL {
        if o.set_for(Some(p)).key == set.key {
            protocols.push(p.as_str());
        }
    }
    let status = match status {
        Some(s) => SetStatus::Tracked(Box::new(s)),
        None => SetStatus::Idle {
            account: &set.key.account,
            provider: &set.provider_name,
            grant: set.grant.as_str(),
            scopes: &set.scopes,
            state: "idle",
        },
    };
    SetView { status, protocols }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_accept_errors_are_logged_once_per_interval_with_a_count() {
        let mut errors = AcceptErrors::default();
        let e = std::io::Error::from_raw_os_error(24); // EMFILE
        errors.failed(&e);
        let first = errors.last_logged.expect("the first one is logged");
        for _ in 0..20 {
            errors.failed(&e);
        }
        assert_eq!(errors.last_logged, Some(first), "not logged again");
        assert_eq!(errors.unlogged, 20, "but counted");
        // Once the interval has passed, the next one is logged with that count.
        errors.last_logged = first.checked_sub(ACCEPT_ERROR_LOG_INTERVAL);
        errors.failed(&e);
        assert_eq!(errors.unlogged, 0);
        assert_ne!(errors.last_logged, Some(first));
    }
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
        // Logged quoted (`?`): the id comes from whoever asked, and unquoted it could
        // pose as further fields of the line.
        let account = crate::protocol::parse_query(query)
            .map(|q| bounded(&q.account))
            .unwrap_or_default();
        if missing {
            tracing::warn!(
                account = ?account,
                held_back,
                "token request without Basic credentials (401): put the user and password of the sidecar's `auth` into EmailEngine's authServer URL (http://USER:PASSWORD@127.0.0.1:8080/authentication)"
            );
        } else {
            let percent_encoded = header
                .and_then(crate::protocol::decode_basic)
                .is_some_and(|pair| pair.contains(&b'%'));
            tracing::warn!(
                account = ?account,
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
            account = ?bounded(id),
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
