//! Small HTTP helpers: the response body type and JSON responses.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

pub type Body = Full<Bytes>;

pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    // Our response types serialize to objects with string keys: this cannot fail.
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    with_json_body(status, Bytes::from(bytes))
}

/// `204 No Content`.
pub fn no_content() -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// A constant JSON body: no serialization, no copy.
pub fn static_json(status: StatusCode, body: &'static [u8]) -> Response<Body> {
    with_json_body(status, Bytes::from_static(body))
}

fn with_json_body(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let json = header::HeaderValue::from_static("application/json");
    response.headers_mut().insert(header::CONTENT_TYPE, json);
    response
}
