//! App Mesh's error types, as the REST API returns them and the SDKs parse them.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::store;

/// Every way an App Mesh operation can fail. The message names the field and the rule.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    ResourceInUse(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("{0}")]
    TooManyTags(String),
    #[error("the store could not commit the change: {0}")]
    Store(#[from] store::Error),
}

impl Error {
    /// The error shape name from the botocore model.
    pub fn type_name(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "BadRequestException",
            Error::NotFound(_) => "NotFoundException",
            Error::Conflict(_) => "ConflictException",
            Error::ResourceInUse(_) => "ResourceInUseException",
            Error::LimitExceeded(_) => "LimitExceededException",
            Error::TooManyTags(_) => "TooManyTagsException",
            Error::Store(e) if e.is_bad_request() => "BadRequestException",
            Error::Store(e) if e.is_retryable() => "ServiceUnavailableException",
            Error::Store(_) => "InternalServerErrorException",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) | Error::LimitExceeded(_) | Error::TooManyTags(_) => {
                StatusCode::BAD_REQUEST
            }
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) | Error::ResourceInUse(_) => StatusCode::CONFLICT,
            Error::Store(e) if e.is_bad_request() => StatusCode::BAD_REQUEST,
            Error::Store(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            Error::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn bad(field: &str, rule: impl std::fmt::Display) -> Self {
        Error::BadRequest(format!("{field}: {rule}"))
    }
}

impl From<trellis_model::FieldError> for Error {
    fn from(e: trellis_model::FieldError) -> Self {
        Error::BadRequest(e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let kind = self.type_name();
        tracing::info!(error.kind = kind, error.message = %self, "request rejected");
        let body = serde_json::json!({ "__type": kind, "message": self.to_string() });
        let mut resp = (self.status(), axum::Json(body)).into_response();
        resp.headers_mut()
            .insert("x-amzn-ErrorType", HeaderValue::from_static(kind));
        resp
    }
}
