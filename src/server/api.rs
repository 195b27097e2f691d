//! HTTP handlers: extract, call the search engine on a blocking thread, map
//! the result. No ranking logic lives here.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiResult, ErrorBody};
use super::state::{self, JobEvent, Lifecycle, SharedState};
use crate::search::{self, Engine, Filters, Photo, Request, SearchResults, Term, TermKind};

fn engine(state: &SharedState) -> ApiResult<Arc<Engine>> {
    state.engine().ok_or_else(|| {
        let (phase, message) = state.lifecycle();
        match phase {
            Lifecycle::Failed => ApiError::not_ready(format!(
                "the server could not start: {}",
                message.unwrap_or_else(|| "unknown error".into())
            )),
            _ => ApiError::not_ready(message.unwrap_or_else(|| "starting up".into())),
        }
    })
}

/// Runs blocking work (model inference, file and index I/O) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// The query: text, or the query language (`"dog" + 0.5*image:42 - "people"`).
    pub q: String,
    /// Results per page (1-10,000, default 24); `offset` pages on through any number.
    pub k: Option<usize>,
    /// Results to skip.
    pub offset: Option<usize>,
    /// Text whose meaning results should avoid.
    pub exclude: Option<String>,
    /// Folder prefix, relative to the library.
    pub folder: Option<String>,
    /// Taken on or after (YYYY-MM-DD).
    pub from: Option<String>,
    /// Taken on or before (YYYY-MM-DD).
    pub to: Option<String>,
    /// File types, comma-separated (`jpeg,png`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub types: Option<String>,
    /// Words of the camera make or model.
    pub camera: Option<String>,
    /// Automatic tags the photos must all have, comma-separated.
    pub tag: Option<String>,
    /// Minimum score: cosine similarity (-1 to 1) for CLIP models, match
    /// probability (0 to 1) for SigLIP models.
    pub min_score: Option<f32>,
    /// Fuse keyword matches (default true).
    pub hybrid: Option<bool>,
    /// `relevance` (default), `newest` or `oldest`: the most relevant results by date.
    #[param(value_type = Option<String>)]
    pub sort: Option<search::Sort>,
    /// Where relevant results end: `auto` (default), `none`, or a score
    /// (cosine similarity; a probability for SigLIP). Each hit says
    /// whether it is `relevant`.
    #[param(value_type = Option<String>)]
    pub cutoff: Option<search::Cutoff>,
}

impl From<SearchParams> for Request {
    fn from(p: SearchParams) -> Self {
        Request {
            q: Some(p.q),
            exclude: p.exclude,
            filters: Some(
                Filters::from_flat(p.folder, p.from, p.to, p.types, p.camera).with_tags(p.tag),
            ),
            k: p.k,
            offset: p.offset,
            min_score: p.min_score,
            hybrid: p.hybrid,
            sort: p.sort,
            cutoff: p.cutoff,
            terms: None,
        }
    }
}

#[utoipa::path(get, path = "/api/search", params(SearchParams),
    responses(
        (status = 200, description = "Ranked photos", body = SearchResults),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 503, description = "Model or index still loading", body = ErrorBody),
    ))]
pub async fn search_get(
    State(state): State<SharedState>,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> ApiResult<Json<SearchResults>> {
    let Query(p) = params.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let engine = engine(&state)?;
    let q = Request::from(p).into_query()?;
    Ok(Json(
        blocking(move || engine.search(&q).map_err(ApiError::from)).await?,
    ))
}

#[utoipa::path(post, path = "/api/search", request_body = Request,
    responses(
        (status = 200, description = "Ranked photos", body = SearchResults),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 404, description = "A photo named by the query does not exist", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 503, description = "Model or index still loading", body = ErrorBody),
    ))]
pub async fn search_post(
    State(state): State<SharedState>,
    body: Result<Json<Request>, JsonRejection>,
) -> ApiResult<Json<SearchResults>> {
    let Json(r) = body.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let engine = engine(&state)?;
    let q = r.into_query()?;
    Ok(Json(
        blocking(move || engine.search(&q).map_err(ApiError::from)).await?,
    ))
}

/// Multipart fields of an image search.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ImageSearchForm {
    /// The picture (JPEG, PNG, WebP, GIF, BMP, TIFF).
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
    /// Optional text (query language) added to the picture.
    pub q: Option<String>,
    /// Weight of the picture against the text (default 1).
    pub weight: Option<f32>,
    pub k: Option<usize>,
    pub offset: Option<usize>,
    pub folder: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    #[schema(rename = "type")]
    pub types: Option<String>,
    pub camera: Option<String>,
    /// Automatic tags, comma-separated.
    pub tag: Option<String>,
}

#[utoipa::path(post, path = "/api/search/image", request_body(content = ImageSearchForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Photos like the uploaded picture", body = SearchResults),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 413, description = "Upload too large", body = ErrorBody),
        (status = 415, description = "Not an image", body = ErrorBody),
        (status = 503, description = "Model or index still loading", body = ErrorBody),
    ))]
pub async fn search_image(
    State(state): State<SharedState>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<Json<SearchResults>> {
    let mut multipart = multipart.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let engine = engine(&state)?;
    let mut file: Option<Vec<u8>> = None;
    let mut fields = std::collections::HashMap::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(ApiError::rejected(e.status(), e.body_text())),
        };
        let name = field.name().unwrap_or("").to_string();
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
        if name == "file" {
            file = Some(data.to_vec());
        } else if [
            "q", "weight", "k", "offset", "folder", "from", "to", "type", "camera", "tag",
        ]
        .contains(&name.as_str())
        {
            let text = String::from_utf8(data.to_vec())
                .map_err(|_| ApiError::bad_query(format!("field {name} is not text")))?;
            fields.insert(name, text);
        } else {
            return Err(ApiError::bad_query(format!("unknown field {name:?}")));
        }
    }
    let file =
        file.ok_or_else(|| ApiError::bad_query("the form needs a file field with the picture"))?;
    if file.is_empty() {
        return Err(ApiError::unsupported("the uploaded file is empty"));
    }
    let num = |name: &str| -> ApiResult<Option<usize>> {
        fields
            .get(name)
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| ApiError::bad_query(format!("{name} must be a number")))
            })
            .transpose()
    };
    let weight: f32 = match fields.get("weight") {
        Some(w) => w
            .trim()
            .parse()
            .map_err(|_| ApiError::bad_query("weight must be a number"))?,
        None => 1.0,
    };
    let request = Request {
        q: fields.get("q").cloned(),
        k: num("k")?,
        offset: num("offset")?,
        filters: Some(
            Filters::from_flat(
                fields.get("folder").cloned(),
                fields.get("from").cloned(),
                fields.get("to").cloned(),
                fields.get("type").cloned(),
                fields.get("camera").cloned(),
            )
            .with_tags(fields.get("tag").cloned()),
        ),
        sort: fields
            .get("sort")
            .map(|s| s.parse::<search::Sort>())
            .transpose()
            .map_err(ApiError::bad_query)?,
        cutoff: fields
            .get("cutoff")
            .map(|s| s.parse::<search::Cutoff>())
            .transpose()
            .map_err(ApiError::bad_query)?,
        ..Request::default()
    };
    // The rules apply before the picture is decoded; its embedding takes
    // the place held for it once it is made.
    let picture = Term {
        kind: TermKind::Vector(Vec::new()),
        weight: search::check_weight(weight)?,
    };
    let mut q = request.into_query_with(vec![picture])?;
    Ok(Json(
        blocking(move || {
            q.terms[0].kind = TermKind::Vector(engine.embed_image(&file)?);
            engine.search(&q).map_err(ApiError::from)
        })
        .await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SimilarParams {
    pub k: Option<usize>,
    pub offset: Option<usize>,
    pub folder: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub types: Option<String>,
    pub camera: Option<String>,
    /// Automatic tags, comma-separated.
    pub tag: Option<String>,
    /// `relevance` (default), `newest` or `oldest`.
    #[param(value_type = Option<String>)]
    pub sort: Option<search::Sort>,
    /// `auto` (default), `none` or a score.
    #[param(value_type = Option<String>)]
    pub cutoff: Option<search::Cutoff>,
}

fn path_id(p: Result<Path<u64>, PathRejection>) -> ApiResult<u64> {
    p.map(|Path(id)| id)
        .map_err(|_| ApiError::bad_query("a photo id is a whole number"))
}

#[utoipa::path(get, path = "/api/photos/{id}/similar", params(("id" = u64, Path, description = "Photo id"), SimilarParams),
    responses(
        (status = 200, description = "Photos like this one, itself excluded", body = SearchResults),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 404, description = "No such photo", body = ErrorBody),
        (status = 503, description = "Model or index still loading", body = ErrorBody),
    ))]
pub async fn similar(
    State(state): State<SharedState>,
    id: Result<Path<u64>, PathRejection>,
    params: Result<Query<SimilarParams>, QueryRejection>,
) -> ApiResult<Json<SearchResults>> {
    let id = path_id(id)?;
    let Query(p) = params.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let engine = engine(&state)?;
    let request = Request {
        k: p.k,
        offset: p.offset,
        filters: Some(
            Filters::from_flat(p.folder, p.from, p.to, p.types, p.camera).with_tags(p.tag),
        ),
        sort: p.sort,
        cutoff: p.cutoff,
        ..Request::default()
    };
    Ok(Json(
        blocking(move || engine.similar(id, request).map_err(ApiError::from)).await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DuplicateParams {
    /// Cosine similarity two photos' embeddings need to be grouped (0 to 1;
    /// default 0.9). Below 0.8 every photo's neighbours are searched again.
    pub threshold: Option<f32>,
    /// Groups per page (1-1,000, default 50).
    pub k: Option<usize>,
    /// Groups to skip.
    pub offset: Option<usize>,
}

#[utoipa::path(get, path = "/api/tags",
    responses(
        (status = 200, description = "The automatic tags photos have, the most common first, each with its count and a cover photo", body = search::tags::TagList),
        (status = 503, description = "Model or index still loading", body = ErrorBody),
    ))]
pub async fn tags(State(state): State<SharedState>) -> ApiResult<Json<search::tags::TagList>> {
    let engine = engine(&state)?;
    Ok(Json(
        blocking(move || engine.tags().map_err(ApiError::from)).await?,
    ))
}

/// Groups per page of `/api/duplicates` when a request does not say.
const DUPLICATE_GROUPS: usize = 50;

#[utoipa::path(get, path = "/api/duplicates", params(DuplicateParams),
    responses(
        (status = 200, description = "Groups of the same picture or near-identical shots, largest first", body = search::duplicates::Duplicates),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 503, description = "Model or index still loading", body = ErrorBody),
    ))]
pub async fn duplicates(
    State(state): State<SharedState>,
    params: Result<Query<DuplicateParams>, QueryRejection>,
) -> ApiResult<Json<search::duplicates::Duplicates>> {
    let Query(p) = params.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
    let engine = engine(&state)?;
    Ok(Json(
        blocking(move || {
            engine
                .duplicates(
                    p.threshold,
                    p.offset.unwrap_or(0),
                    p.k.unwrap_or(DUPLICATE_GROUPS),
                )
                .map_err(ApiError::from)
        })
        .await?,
    ))
}

#[utoipa::path(get, path = "/api/photos/{id}", params(("id" = u64, Path, description = "Photo id")),
    responses(
        (status = 200, description = "The photo's metadata", body = Photo),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such photo", body = ErrorBody),
        (status = 503, description = "Index still loading", body = ErrorBody),
    ))]
pub async fn photo(
    State(state): State<SharedState>,
    id: Result<Path<u64>, PathRejection>,
) -> ApiResult<Json<Photo>> {
    let id = path_id(id)?;
    let engine = engine(&state)?;
    Ok(Json(
        blocking(move || engine.photo(id).map_err(ApiError::from)).await?,
    ))
}

fn file_response(bytes: Vec<u8>, content_type: &str, cache: &str) -> Response {
    let mut r = Response::new(Body::from(bytes));
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(cache).unwrap_or(HeaderValue::from_static("no-cache")),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[utoipa::path(get, path = "/api/photos/{id}/thumbnail", params(("id" = u64, Path, description = "Photo id")),
    responses(
        (status = 200, description = "JPEG thumbnail, 256 px on the longest side", content_type = "image/jpeg"),
        (status = 404, description = "No such photo", body = ErrorBody),
    ))]
pub async fn thumbnail(
    State(state): State<SharedState>,
    id: Result<Path<u64>, PathRejection>,
) -> ApiResult<Response> {
    let id = path_id(id)?;
    let engine = engine(&state)?;
    let bytes = blocking(move || Ok(engine.thumbnail(id)?)).await?;
    // Thumbnails are content-addressed: a photo id's thumbnail only changes with a new id.
    Ok(file_response(bytes, "image/jpeg", "private, max-age=86400"))
}

#[utoipa::path(get, path = "/api/photos/{id}/original", params(("id" = u64, Path, description = "Photo id")),
    responses(
        (status = 200, description = "The original file", content(("image/jpeg"), ("image/png"), ("image/webp"), ("image/gif"), ("image/bmp"), ("image/tiff"), ("application/octet-stream"))),
        (status = 404, description = "No such photo, or its file is gone", body = ErrorBody),
        (status = 409, description = "The file changed since it was indexed (re-index)", body = ErrorBody),
    ))]
pub async fn original(
    State(state): State<SharedState>,
    id: Result<Path<u64>, PathRejection>,
) -> ApiResult<Response> {
    let id = path_id(id)?;
    let engine = engine(&state)?;
    let (bytes, mime) = blocking(move || engine.original(id).map_err(ApiError::from)).await?;
    Ok(file_response(bytes, mime, "private, no-cache"))
}

/// The server, its index and its re-index job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusResponse {
    pub state: Lifecycle,
    /// What start-up is doing, or why it failed.
    pub message: Option<String>,
    pub version: String,
    pub photos: Option<usize>,
    pub library: Option<String>,
    pub model: Option<String>,
    pub embedding_dim: Option<usize>,
    /// How the model computes: `exact` (f32) or `fast` (bf16).
    #[schema(value_type = Option<String>)]
    pub precision: Option<crate::search::Precision>,
    /// Where the vectors live: `embedded`, or `milvus://HOST:PORT/COLLECTION`
    /// (filters are evaluated inside Milvus's search; keyword fusion uses
    /// this server's keyword index, kept beside the index's store), with
    /// ` shard I/N` for one shard's index, or ` (replica)` for a search
    /// replica, whose keyword index is built from the records the
    /// collection holds and kept up to date every 5 seconds.
    pub vectors: Option<String>,
    pub reindex: ReindexStatus,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReindexStatus {
    pub running: bool,
    /// Statistics of the run in progress.
    #[schema(value_type = Option<Object>)]
    pub progress: Option<serde_json::Value>,
    /// Summary of the last completed run.
    #[schema(value_type = Option<Object>)]
    pub last: Option<serde_json::Value>,
    pub last_error: Option<String>,
}

#[utoipa::path(get, path = "/api/status", responses((status = 200, description = "Server state", body = StatusResponse)))]
pub async fn status(State(state): State<SharedState>) -> ApiResult<Json<StatusResponse>> {
    let (phase, message) = state.lifecycle();
    let engine = state.engine();
    let (photos, library, model, dim, precision, vectors) = match &engine {
        Some(e) => {
            let engine = e.clone();
            let (n, lib, vectors) = blocking(move || {
                Ok((
                    engine.index().store().count(),
                    engine.index().meta().library.clone(),
                    engine.index().vectors().engine(),
                ))
            })
            .await?;
            let info = e.model_info();
            (
                Some(n),
                Some(lib),
                Some(info.id.clone()),
                Some(info.embedding_dim),
                Some(info.precision),
                Some(vectors),
            )
        }
        None => (None, None, None, None, None, None),
    };
    let job = state.job();
    let reindex = ReindexStatus {
        running: job.running,
        progress: job
            .progress
            .as_ref()
            .map(|p| serde_json::to_value(p).unwrap_or_default()),
        last: job
            .last_summary
            .as_ref()
            .map(|s| serde_json::to_value(s).unwrap_or_default()),
        last_error: job.last_error.clone(),
    };
    drop(job);
    Ok(Json(StatusResponse {
        state: phase,
        message,
        version: env!("CARGO_PKG_VERSION").to_string(),
        photos,
        library,
        model,
        embedding_dim: dim,
        precision,
        vectors,
        reindex,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReindexStarted {
    pub started: bool,
}

#[utoipa::path(post, path = "/api/reindex",
    responses(
        (status = 202, description = "Re-index started; follow it at /api/reindex/events", body = ReindexStarted),
        (status = 409, description = "A re-index is already running", body = ErrorBody),
        (status = 503, description = "Index still loading", body = ErrorBody),
    ))]
pub async fn reindex(
    State(state): State<SharedState>,
) -> ApiResult<(StatusCode, Json<ReindexStarted>)> {
    state::start_reindex(&state)?;
    Ok((StatusCode::ACCEPTED, Json(ReindexStarted { started: true })))
}

#[utoipa::path(get, path = "/api/reindex/events",
    responses((status = 200, description = "Server-sent events: `progress`, `done`, `failed` (JSON data)", content_type = "text/event-stream")))]
pub async fn reindex_events(
    State(state): State<SharedState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = state.events.subscribe();
    // Start with where the job stands, so a page opened mid-run shows it at once.
    let first = {
        let job = state.job();
        match (&job.progress, job.running) {
            (Some(p), true) => Some(JobEvent::Progress {
                progress: serde_json::to_value(p).unwrap_or_default(),
            }),
            _ => None,
        }
    };
    let stream = tokio_stream::iter(first.into_iter().map(Ok))
        .chain(BroadcastStream::new(rx))
        .filter_map(|e| e.ok())
        .map(|e| {
            let name = match &e {
                JobEvent::Progress { .. } => "progress",
                JobEvent::Done { .. } => "done",
                JobEvent::Failed { .. } => "failed",
            };
            Ok(Event::default()
                .event(name)
                .json_data(&e)
                .unwrap_or_else(|_| Event::default().event(name)))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
