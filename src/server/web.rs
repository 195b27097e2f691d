//! The web page, embedded in the binary from `web/`: no separate front-end
//! server and no build step.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::SharedState;

const INDEX: &str = include_str!("../../web/index.html");
const APP: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");
const ICON: &str = include_str!("../../web/favicon.svg");
/// The page's modules, `web/js/`, served under `/js/`.
const MODULES: &[(&str, &str)] = &[
    ("api.js", include_str!("../../web/js/api.js")),
    ("dom.js", include_str!("../../web/js/dom.js")),
    ("duplicates.js", include_str!("../../web/js/duplicates.js")),
    ("filters.js", include_str!("../../web/js/filters.js")),
    ("grid.js", include_str!("../../web/js/grid.js")),
    ("search.js", include_str!("../../web/js/search.js")),
    ("state.js", include_str!("../../web/js/state.js")),
    ("status.js", include_str!("../../web/js/status.js")),
    ("tags.js", include_str!("../../web/js/tags.js")),
    ("url.js", include_str!("../../web/js/url.js")),
    ("viewer.js", include_str!("../../web/js/viewer.js")),
];

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

pub fn routes() -> Router<SharedState> {
    let mut router = Router::new();
    for (name, body) in MODULES {
        router = router.route(
            &format!("/js/{name}"),
            get(|| async { asset("text/javascript; charset=utf-8", body) }),
        );
    }
    router
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        // A photo opened in the page has its own address; the page opens it.
        .route(
            "/photo/{id}",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        // The duplicate groups' view and the tag list.
        .route(
            "/duplicates",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/tags",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/favicon.svg",
            get(|| async { asset("image/svg+xml", ICON) }),
        )
}
