//! The HTTP edge's one error type: each variant is one status code; a 5xx
//! body says nothing about the node's insides (the detail is logged inside
//! the request's span).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400: the request cannot be understood (bad query parameter, broken
    /// multipart body, malformed UID in the path).
    #[error("{0}")]
    BadRequest(String),
    /// 401: no bearer token, or one the node does not know.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// 403: the token lacks the scope this request needs.
    #[error("the token lacks the {0} scope")]
    Forbidden(&'static str),
    /// 404: no such study, series, instance, frame or resource.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 406: none of the media types the Accept header allows can be served.
    #[error("not acceptable: {0}")]
    NotAcceptable(String),
    /// 413: the request body is larger than the configured limit.
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(u64),
    /// 408: the client stopped sending its request body.
    #[error("no request body data for {0} s")]
    RequestTimeout(u64),
    /// 415: the request's Content-Type is not one this resource takes.
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// 503: the index or the blob store cannot be reached; the detail is
    /// logged, not sent.
    #[error("service unavailable")]
    Unavailable(String),
    /// 500: anything else that is the node's fault; the detail is logged,
    /// not sent.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<crate::index::Error> for Error {
    fn from(e: crate::index::Error) -> Self {
        Error::Unavailable(format!("index: {e}"))
    }
}

impl From<crate::storage::Error> for Error {
    fn from(e: crate::storage::Error) -> Self {
        match e {
            // A blob that fails its hash is a 500 (never served), not a
            // missing resource.
            crate::storage::Error::Corrupt { .. } => Error::Internal(format!("blob store: {e}")),
            other => Error::Unavailable(format!("blob store: {other}")),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Error::Unavailable(detail) | Error::Internal(detail) => {
                // The request span (method, path) is the parent.
                tracing::error!(%status, detail, "request failed");
            }
            other => tracing::debug!(%status, error = %other, "request refused"),
        }
        let mut response =
            (status, axum::Json(json!({ "error": self.to_string() }))).into_response();
        if matches!(self, Error::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"huren\""),
            );
        }
        response
    }
}
