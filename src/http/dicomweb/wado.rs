//! WADO-RS (PS3.18 §10.4). Waits for `crate::query`.

use axum::http::StatusCode;

pub async fn study() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn study_metadata() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn series() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn series_metadata() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn instance() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn instance_metadata() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn frames() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn bulkdata() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
