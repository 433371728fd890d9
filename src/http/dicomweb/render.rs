//! Rendered and thumbnail resources.

use axum::http::StatusCode;

pub async fn instance_rendered() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn instance_thumbnail() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn frame_rendered() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub async fn frame_thumbnail() -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
