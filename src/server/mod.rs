//! `clipdex serve`: the HTTP API (axum) and the web page, over the search
//! engine. Handlers are thin (`api.rs`); errors become statuses in one place
//! (`error.rs`); start-up and re-indexing run on threads of their own
//! (`state.rs`); inference and file I/O run on tokio's blocking pool.
//!
//! Safe by default: binds 127.0.0.1; any other address needs a token, checked
//! on every request (`Authorization: Bearer`, a `clipdex_token` cookie, or
//! `?token=` which also sets the cookie for the page's images); without a
//! token only loopback names (and `--allow-host` names) are accepted as
//! `Host`, against DNS rebinding; state-changing requests from another
//! origin are refused; files are served by photo id only; bodies, queries,
//! header and body read times and open connections are bounded; no CORS
//! unless `--cors` names an origin.

pub mod api;
pub mod error;
pub mod state;
mod web;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;

pub use state::{AppState, ServerConfig, SharedState};

use error::ApiError;

/// Largest JSON body (a query is small).
const MAX_JSON_BODY: usize = 64 * 1024;
/// A client must send a request's headers within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body must keep arriving: at most this long between two chunks,
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// past this grace time at least [`BODY_MIN_RATE`] bytes a second on average,
pub const BODY_GRACE: Duration = Duration::from_secs(10);
pub const BODY_MIN_RATE: u64 = 4096;
/// and all of it within this time.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(OpenApi)]
#[openapi(
    info(title = "clipdex", description = "Semantic image search over a photo library (CLIP)."),
    modifiers(&Security),
    paths(
        api::search_get,
        api::search_post,
        api::search_image,
        api::similar,
        api::duplicates,
        api::tags,
        api::photo,
        api::thumbnail,
        api::original,
        api::status,
        api::reindex,
        api::reindex_events,
    )
)]
pub struct ApiDoc;

/// The token scheme, required on every operation when the server has a
/// token, and the answers every operation can give: 401 without a valid
/// token, 403 for a refused host or origin, 503 while starting.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("the server's --token"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new("clipdex_token"))),
        );
        // Either scheme, or none when the server runs without a token (loopback).
        openapi.security = Some(vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("cookie", Vec::<String>::new()),
            SecurityRequirement::default(),
        ]);
        let error = |description: &str| -> RefOr<utoipa::openapi::Response> {
            let content = ContentBuilder::new()
                .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                .build();
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content("application/json", content)
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                let responses = &mut op.responses.responses;
                responses
                    .entry("401".into())
                    .or_insert_with(|| error("A token is required and was missing or wrong"));
                responses.entry("403".into()).or_insert_with(|| {
                    error("Refused host name, or a state change from another origin")
                });
                responses
                    .entry("405".into())
                    .or_insert_with(|| error("The endpoint does not take this method"));
            }
        }
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// The router, with every layer.
pub fn app(state: SharedState) -> Router {
    let upload_limit = state.config.max_upload;
    let api = Router::new()
        .route(
            "/api/search",
            get(api::search_get)
                .post(api::search_post)
                .layer(DefaultBodyLimit::max(MAX_JSON_BODY)),
        )
        .route(
            "/api/search/image",
            post(api::search_image).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/api/duplicates", get(api::duplicates))
        .route("/api/tags", get(api::tags))
        .route("/api/photos/{id}", get(api::photo))
        .route("/api/photos/{id}/similar", get(api::similar))
        .route("/api/photos/{id}/thumbnail", get(api::thumbnail))
        .route("/api/photos/{id}/original", get(api::original))
        .route("/api/status", get(api::status))
        .route("/api/reindex", post(api::reindex))
        .route("/api/reindex/events", get(api::reindex_events))
        .route("/api/openapi.json", get(openapi));
    Router::new()
        .merge(api)
        .merge(web::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// Whether `host` (a `Host` header) names this server: a loopback name or
/// address, the address it is bound to, or a name given with `--allow-host`,
/// and the port it listens on. A web page that rebinds its own domain to
/// 127.0.0.1 still sends its domain here, and is refused.
fn host_allowed(config: &ServerConfig, bound: Option<SocketAddr>, host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => (name, Some(port)),
        _ => (host, None),
    };
    if let (Some(bound), Some(port)) = (bound, port) {
        if port.parse::<u16>().ok() != Some(bound.port()) {
            return false;
        }
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let ip = name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    name == "localhost"
        || ip.is_some_and(|ip| ip.is_loopback() || bound.is_some_and(|b| b.ip() == ip))
        || config
            .allow_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&name))
}

/// Whether a request that changes state comes from the page itself (or the
/// `--cors` origin): browsers name the origin of every cross-site POST.
fn origin_allowed(config: &ServerConfig, request: &Request) -> bool {
    let headers = request.headers();
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // No Origin: not a browser's cross-site request (curl, the CLI), unless fetch metadata says so.
        return headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) != Some("cross-site");
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let own = host.is_some_and(|h| {
        origin.eq_ignore_ascii_case(&format!("http://{h}"))
            || origin.eq_ignore_ascii_case(&format!("https://{h}"))
    });
    // Behind a reverse proxy the page's origin is the proxy's name, given with --allow-host.
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    let origin_name = origin_host
        .rsplit_once(':')
        .filter(|(_, p)| p.parse::<u16>().is_ok())
        .map_or(origin_host, |(n, _)| n);
    let proxied = config
        .allow_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(origin_name));
    own || proxied || config.cors.as_deref().is_some_and(|c| c == origin)
}

/// Host, origin and token checks and CORS, on every request.
async fn guard(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let cors = state.config.cors.clone();
    if request.method() == Method::OPTIONS && cors.is_some() {
        return with_cors(StatusCode::NO_CONTENT.into_response(), cors.as_deref());
    }
    // Without a token, the Host name is what tells a page of ours from a
    // page that rebound its own domain to this address. (A client without
    // Host, HTTP/1.0, is not a browser: rebinding needs one.) With a token,
    // rebinding gains nothing: the token is never sent to a foreign name.
    if state.config.token.is_none() {
        if let Some(host) = request.headers().get(header::HOST) {
            let ok = host
                .to_str()
                .is_ok_and(|h| host_allowed(&state.config, state.local_addr(), h));
            if !ok {
                return with_cors(
                    ApiError::forbidden(
                        "this server does not answer to that host name; add it with --allow-host",
                    )
                    .into_response(),
                    cors.as_deref(),
                );
            }
        }
    }
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !safe && !origin_allowed(&state.config, &request) {
        return with_cors(
            ApiError::forbidden("cross-origin request refused").into_response(),
            cors.as_deref(),
        );
    }
    let mut set_cookie = None;
    if let Some(token) = state.config.token.as_deref() {
        let from_header = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let from_cookie = request
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| {
                c.split(';')
                    .find_map(|kv| kv.trim().strip_prefix("clipdex_token="))
            });
        let from_query = request
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
            .map(|t| percent_decode(t));
        let ok = from_header.is_some_and(|t| same(t, token))
            || from_cookie.is_some_and(|t| same(t, token))
            || from_query.as_deref().is_some_and(|t| same(t, token));
        if !ok {
            return with_cors(ApiError::unauthorized().into_response(), cors.as_deref());
        }
        if from_query.is_some() {
            set_cookie = Some(format!(
                "clipdex_token={token}; Path=/; HttpOnly; SameSite=Strict"
            ));
        }
    }
    let mut response = next.run(request).await;
    if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    with_cors(response, cors.as_deref())
}

/// Compares in time that depends on neither the token nor the guess (not
/// even their lengths): both are hashed, and blake3 compares hashes in
/// constant time.
fn same(a: &str, b: &str) -> bool {
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

/// Reads a request's body before the handler runs, and no more than the
/// largest body any route takes. A client trickling a body cannot hold a
/// connection and a handler: the body must keep coming ([`BODY_IDLE_TIMEOUT`]
/// between chunks), at [`BODY_MIN_RATE`] on average once [`BODY_GRACE`] has
/// passed, and end within [`BODY_TIMEOUT`].
async fn read_body(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    use http_body_util::BodyExt;
    let (parts, mut body) = request.into_parts();
    let limit = state.config.max_upload.max(MAX_JSON_BODY) + 64 * 1024;
    let start = tokio::time::Instant::now();
    let deadline = start + BODY_TIMEOUT;
    let too_slow = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request body arrived too slowly",
        )
        .into_response()
    };
    let mut bytes = Vec::new();
    loop {
        let elapsed = start.elapsed();
        if elapsed > BODY_GRACE && (bytes.len() as u64) < BODY_MIN_RATE * elapsed.as_secs() {
            return too_slow();
        }
        // Wake when the rate would fall below the minimum, if that comes first.
        let rate_limit =
            Duration::from_secs((bytes.len() as u64 / BODY_MIN_RATE).max(BODY_GRACE.as_secs()) + 1)
                .saturating_sub(elapsed);
        let wait = BODY_IDLE_TIMEOUT
            .min(rate_limit)
            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => return too_slow(),
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return ApiError::bad_query("the request body could not be read").into_response();
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if bytes.len() + data.len() > limit {
                        return ApiError::too_large("the request body is too large")
                            .into_response();
                    }
                    bytes.extend_from_slice(&data);
                }
            }
        }
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn with_cors(mut response: Response, origin: Option<&str>) -> Response {
    if let Some(origin) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
    }
    response
}

/// A span and one log line per request.
async fn log_request(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let span = tracing::info_span!("request", %method, %path);
    let start = Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let status = response.status().as_u16();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, ms, "request failed");
        } else {
            tracing::debug!(status, ms, "request");
        }
    });
    response
}

/// Whether an address is loopback only.
pub fn is_local(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Serves until Ctrl-C.
///
/// HTTP/1.1 connections, each with a header read timeout
/// ([`HEADER_TIMEOUT`]); at most `max_connections` open at once, further
/// ones closed on accept. On Ctrl-C the server stops accepting and gives
/// open requests a few seconds to finish.
pub async fn serve(state: SharedState, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let _ = state.local_addr.set(listener.local_addr()?);
    let app = app(state.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.config.max_connections.max(1),
    ));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    // Refused connections are reported at most every 10 s, not one line each.
    let (mut refused, mut last_refusal_report) = (0u64, Instant::now() - Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if last_refusal_report.elapsed() >= Duration::from_secs(10) {
                tracing::warn!(%peer, refused, "connection limit reached; closing new connections");
                (refused, last_refusal_report) = (0, Instant::now());
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    tracing::info!("stopping");
    state::stop_jobs(&state);
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("closing the connections still open");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_and_decode() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
        assert_eq!(percent_decode("a%20b+c%2F"), "a b c/");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn hosts_are_loopback_names_or_allowed_ones() {
        let mut config = ServerConfig::for_index("index".into());
        config.allow_hosts = vec!["photos.lan".into()];
        let bound: Option<SocketAddr> = Some("127.0.0.1:7878".parse().unwrap());
        for ok in [
            "localhost:7878",
            "127.0.0.1:7878",
            "[::1]:7878",
            "LOCALHOST:7878",
            "localhost",
            "photos.lan:7878",
            "127.0.0.2:7878",
        ] {
            assert!(host_allowed(&config, bound, ok), "{ok}");
        }
        for bad in [
            "evil.example:7878",
            "localhost:80",
            "localhost.evil.example:7878",
            "127.0.0.1.nip.io:7878",
            "photos.lan.evil:7878",
            "[::1]:1",
            "",
        ] {
            assert!(!host_allowed(&config, bound, bad), "{bad}");
        }
    }
}
