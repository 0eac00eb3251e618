//! The one table from error kind to HTTP status. Every handler returns
//! [`ServeError`]; its status and `{"error": "..."}` body come from here, and
//! so does the mapping of the engine's ([`InferError`]), the image
//! decoder's ([`ImageError`]) and search's ([`SearchError`]) errors onto it.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use geossl_raster::{ImageError, ImageErrorKind};

use crate::infer::InferError;
use crate::search::SearchError;

/// An error a request can end with. Only [`ServeError::Internal`] is a 5xx
/// other than 503, and reaching it is a bug.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// 400: the request is malformed (bad JSON, missing field, undecodable image).
    #[error("{0}")]
    BadRequest(String),
    /// 401: an API key is configured and the request did not present it.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: unknown route, model or version.
    #[error("{0}")]
    NotFound(String),
    /// 413: body or pixel count over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// 415: a content type or image format the endpoint does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: a well-formed request the model cannot take (shape, dtype, bands, values).
    #[error("{0}")]
    Unprocessable(String),
    /// 429: queue or in-flight limit reached, or the deadline passed while queued.
    #[error("{message}")]
    Overloaded { message: String, retry_after_s: u64 },
    /// 503: not ready yet, or draining.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug (inference failed on a validated input, a worker died).
    #[error("{0}")]
    Internal(String),
}

impl ServeError {
    /// The HTTP status this error answers with (the table below).
    pub fn status(&self) -> u16 {
        self.status_code().as_u16()
    }

    /// Short machine-readable kind, used as a metric label and in logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::TooLarge(_) => "too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Unprocessable(_) => "unprocessable",
            Self::Overloaded { .. } => "overloaded",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ServeError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if matches!(self, Self::Internal(_)) {
            tracing::error!(error = %self, "internal error");
        }
        let mut r = HttpResponse::build(self.status_code());
        match self {
            Self::Overloaded { retry_after_s, .. } => {
                r.insert_header((header::RETRY_AFTER, retry_after_s.to_string()));
            }
            Self::Unavailable(_) => {
                r.insert_header((header::RETRY_AFTER, "1"));
            }
            Self::Unauthorized(_) => {
                r.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            _ => {}
        }
        r.json(serde_json::json!({ "error": self.to_string() }))
    }
}

impl From<InferError> for ServeError {
    fn from(e: InferError) -> Self {
        match e {
            InferError::Invalid(m) => ServeError::Unprocessable(m),
            InferError::Overloaded { message, retry_after_s } => ServeError::Overloaded { message, retry_after_s },
            InferError::Closed(m) => ServeError::Unavailable(m),
            InferError::Backend(m) => ServeError::Internal(m),
        }
    }
}

impl From<ImageError> for ServeError {
    fn from(e: ImageError) -> Self {
        let m = e.to_string();
        match e.kind() {
            ImageErrorKind::Malformed => ServeError::BadRequest(m),
            ImageErrorKind::Format => ServeError::UnsupportedMediaType(m),
            ImageErrorKind::TooLarge => ServeError::TooLarge(m),
            ImageErrorKind::Unprocessable => ServeError::Unprocessable(m),
        }
    }
}

impl From<SearchError> for ServeError {
    fn from(e: SearchError) -> Self {
        match e {
            SearchError::BadQuery(m) => ServeError::BadRequest(m),
            SearchError::NotFound(m) => ServeError::NotFound(m),
            SearchError::Mismatch(m) => ServeError::Unprocessable(m),
            SearchError::Index(m) => ServeError::Internal(m),
        }
    }
}
