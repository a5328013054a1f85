//! Responses the proxy writes itself: JSON errors with the request id.

use bytes::Bytes;
use pingora::{Result, http::ResponseHeader};
use pingora_proxy::Session;

pub async fn json_error(
    session: &mut Session,
    status: u16,
    code: &str,
    message: &str,
    request_id: &str,
) -> Result<()> {
    let body = Bytes::from(
        serde_json::json!({"error": code, "message": message, "request_id": request_id})
            .to_string(),
    );
    let mut header = ResponseHeader::build(status, Some(4))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("x-request-id", request_id)?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}
