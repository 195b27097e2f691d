//! The one place an error becomes an HTTP status: `{"error": {"code", "message"}}`.
//! Clients get a short message and a stable code, never a backtrace or a path
//! on the server; the details go to the log.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::state::JobError;
use crate::search;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: `bad_query`, `not_found`, `payload_too_large`,
    /// `unsupported_media_type`, `conflict`, `not_ready`, `busy`, `unauthorized`,
    /// `forbidden`, `method_not_allowed`, `internal`.
    pub code: String,
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds a client should wait before trying again (503 when busy).
    pub retry_after: Option<u32>,
    /// What went wrong inside, for the log only (never sent).
    detail: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            detail: None,
        }
    }
    pub fn bad_query(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_query", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn not_ready(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }
    /// At a limit now; the same request may pass in `seconds`.
    pub fn busy(message: impl Into<String>, seconds: u32) -> Self {
        Self {
            retry_after: Some(seconds),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
        }
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not take that method",
        )
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid token is required",
        )
    }
    /// An internal failure: reported without details; `detail` goes to the
    /// log when the response is made.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self {
            detail: Some(detail.to_string()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log",
            )
        }
    }

    /// Maps a request body's or query's rejection by axum.
    pub fn rejected(status: StatusCode, message: String) -> Self {
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => Self::too_large("the request body is too large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::unsupported(message),
            s if s.is_server_error() => Self::internal(message),
            _ => Self::bad_query(message),
        }
    }
}

impl From<search::Error> for ApiError {
    fn from(e: search::Error) -> Self {
        use search::Error as E;
        match e {
            E::BadQuery(m) => Self::bad_query(m),
            E::NotFound(m) => Self::not_found(m),
            E::NotAnImage(m) => Self::unsupported(m),
            E::TooLarge(m) => Self::too_large(m),
            E::Busy(m) => Self::busy(m, 1),
            E::Changed(m) => Self::conflict(m),
            // The vector engine (Milvus) not answering: the server is fine
            // and answers again when it does.
            e if e.engine_unavailable().is_some() => Self {
                retry_after: Some(5),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "engine_unavailable",
                    e.engine_unavailable().unwrap_or_default(),
                )
            },
            E::Store(_)
            | E::Vectors(_)
            | E::Keywords(_)
            | E::Index(_)
            | E::Model(_)
            | E::Pixels(_)
            | E::BatcherStopped => Self::internal(e),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::NotReady => Self::not_ready(e.to_string()),
            JobError::AlreadyRunning => Self::conflict(e.to_string()),
            JobError::Spawn(_) => Self::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    /// Logs a server failure here, once, with what the client is not told.
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(
                status = self.status.as_u16(),
                code = self.code,
                detail = self.detail.as_deref().unwrap_or(&self.message),
                "request failed"
            );
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
