//! QIDO-RS (PS3.18 §10.6). Waits for `crate::query`.

use axum::http::StatusCode;

pub async fn studies() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn study_series() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn study_instances() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn series_instances() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn all_series() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn all_instances() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
