//! `clipdex serve`: the HTTP API (axum) and the web page, over the search
//! engine. Handlers are thin (`api.rs`); errors become statuses in one place
//! (`error.rs`); start-up and re-indexing run on threads of their own
//! (`state.rs`); inference and file I/O run on tokio's blocking pool.
//!
//! Safe by default: binds 127.0.0.1; any other address needs a token, checked
//! on every request (`Authorization: Bearer`, a `clipdex_token` cookie, or
//! `?token=` which also sets the cookie for the page's images); files are
//! served by photo id only; bodies and queries are bounded; no CORS unless
//! `--cors` names an origin.

pub mod api;
pub mod error;
pub mod state;
mod web;

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;

pub use state::{AppState, ServerConfig, SharedState};

use error::ApiError;

/// Largest JSON body (a query is small).
const MAX_JSON_BODY: usize = 64 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(title = "clipdex", description = "Semantic image search over a photo library (CLIP)."),
    paths(
        api::search_get,
        api::search_post,
        api::search_image,
        api::similar,
        api::photo,
        api::thumbnail,
        api::original,
        api::status,
        api::reindex,
        api::reindex_events,
    )
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// The router, with every layer.
pub fn app(state: SharedState) -> Router {
    let upload_limit = state.config.max_upload;
    let api = Router::new()
        .route("/api/search", get(api::search_get).post(api::search_post).layer(DefaultBodyLimit::max(MAX_JSON_BODY)))
        .route("/api/search/image", post(api::search_image).layer(DefaultBodyLimit::max(upload_limit)))
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
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// Token check and CORS, on every request.
async fn guard(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let cors = state.config.cors.clone();
    if request.method() == Method::OPTIONS && cors.is_some() {
        return with_cors(StatusCode::NO_CONTENT.into_response(), cors.as_deref());
    }
    let mut set_cookie = None;
    if let Some(token) = state.config.token.as_deref() {
        let from_header = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let from_cookie = request.headers().get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|c| {
            c.split(';').find_map(|kv| kv.trim().strip_prefix("clipdex_token="))
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
            set_cookie = Some(format!("clipdex_token={token}; Path=/; HttpOnly; SameSite=Strict"));
        }
    }
    let mut response = next.run(request).await;
    if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    with_cors(response, cors.as_deref())
}

/// Compares without an early exit, so timing does not reveal the token.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
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
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
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
pub async fn serve(state: SharedState, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let app = app(state.clone());
    let shutdown = {
        let state = state.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("stopping");
            state::stop_jobs(&state);
        }
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_and_decode() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert_eq!(percent_decode("a%20b+c%2F"), "a b c/");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
