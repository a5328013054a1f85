//! Responses the proxy writes itself: JSON and HTML errors, redirects. Each one carries the
//! request id and, on HTTPS, `Strict-Transport-Security`, like every proxied response, and
//! once the request has a route, that route's response headers and CORS headers.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use pingora::{ErrorType::InvalidHTTPHeader, OrErr, Result, http::ResponseHeader};
use pingora_proxy::Session;

use crate::{
    header_rules::{HeaderEdit, Vars, X_CORRELATION_ID, X_REQUEST_ID},
    routes::RouteHeaders,
    statics::Site,
};

/// A JSON error the proxy answers with: the status, and the `error` code and `message` of
/// the body (`request_id` is the request's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
}

/// The headers every response gets.
pub struct Stamp<'a> {
    pub request_id: &'a str,
    /// The id that ties this request to others of one transaction: a trusted proxy's, or the
    /// request id.
    pub correlation_id: &'a str,
    /// `Strict-Transport-Security`, on HTTPS connections only.
    pub hsts: Option<&'a str>,
    /// The route's response rules and CORS, once the request has a route.
    pub route: Option<RouteStamp<'a>>,
}

/// What a route adds to each of its responses.
pub struct RouteStamp<'a> {
    pub headers: &'a RouteHeaders,
    pub vars: Vars<'a>,
    /// `Access-Control-Allow-Origin` for this request, on a CORS route.
    pub allow_origin: Option<&'a HeaderValue>,
    /// The static site, on a static route: it may have its own error pages.
    pub site: Option<&'a Site>,
}

impl Stamp<'_> {
    pub fn apply(&self, header: &mut impl HeaderEdit) -> Result<()> {
        let id = HeaderValue::from_str(self.request_id).or_err(InvalidHTTPHeader, "request id")?;
        header.put(&X_REQUEST_ID, id)?;
        let correlation = HeaderValue::from_str(self.correlation_id)
            .or_err(InvalidHTTPHeader, "correlation id")?;
        header.put(&X_CORRELATION_ID, correlation)?;
        if let Some(hsts) = self.hsts {
            let hsts = HeaderValue::from_str(hsts).or_err(InvalidHTTPHeader, "tls.hsts")?;
            header.put(&http::header::STRICT_TRANSPORT_SECURITY, hsts)?;
        }
        if let Some(route) = &self.route {
            let rules = &route.headers.response;
            if !rules.is_empty() {
                rules.apply(header, &route.vars)?;
            }
            if let Some(cors) = &route.headers.cors {
                cors.apply(header, route.allow_origin)?;
            }
        }
        Ok(())
    }
}

pub async fn json_error(
    session: &mut Session,
    stamp: &Stamp<'_>,
    status: u16,
    code: &str,
    message: &str,
) -> Result<()> {
    json_error_with(session, stamp, status, code, message, &[]).await
}

/// [`json_error`] with extra headers (`Allow`, ...).
pub async fn json_error_with(
    session: &mut Session,
    stamp: &Stamp<'_>,
    status: u16,
    code: &str,
    message: &str,
    extra: &[(&'static str, &str)],
) -> Result<()> {
    let body = serde_json::json!({
        "error": code,
        "message": message,
        "request_id": stamp.request_id,
        "correlation_id": stamp.correlation_id,
    });
    let header = header_with(status, "application/json", extra)?;
    send(session, stamp, header, Bytes::from(body.to_string())).await
}

/// An error as a small HTML page for browsers (the route's own page for the status, when its
/// static site has one), JSON for everyone else.
pub async fn error_for_client(
    session: &mut Session,
    stamp: &Stamp<'_>,
    status: u16,
    code: &str,
    message: &str,
) -> Result<()> {
    error_for_client_with(session, stamp, status, code, message, &[]).await
}

/// [`error_for_client`] with extra headers (`WWW-Authenticate`, `Retry-After`, ...).
pub async fn error_for_client_with(
    session: &mut Session,
    stamp: &Stamp<'_>,
    status: u16,
    code: &str,
    message: &str,
    extra: &[(&'static str, &str)],
) -> Result<()> {
    // The answer depends on `Accept` and on the moment: no cache may keep it, nor hand one
    // client's form to another.
    let mut extra = extra.to_vec();
    extra.extend([("cache-control", "no-store"), ("vary", "Accept")]);
    let extra = extra.as_slice();
    let wants_html = session
        .req_header()
        .headers
        .get("accept")
        .is_some_and(|accept| accept.as_bytes().windows(9).any(|w| w == b"text/html"));
    if !wants_html {
        return json_error_with(session, stamp, status, code, message, extra).await;
    }
    if let Some(site) = stamp.route.as_ref().and_then(|route| route.site)
        && site.send_error_page(session, stamp, status, extra).await?
    {
        return Ok(());
    }
    let title = match status {
        401 => "401 Unauthorized",
        403 => "403 Forbidden",
        404 => "404 Not Found",
        405 => "405 Method Not Allowed",
        429 => "429 Too Many Requests",
        _ => "Error",
    };
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>{ERROR_PAGE_STYLE}</style></head>\n<body><h1>{title}</h1><p>{}</p>\
         <p><small>request id {}</small></p></body></html>\n",
        html_escape(message),
        html_escape(stamp.request_id)
    );
    let header = header_with(status, "text/html; charset=utf-8", extra)?;
    send(session, stamp, header, Bytes::from(page)).await
}

pub async fn redirect(
    session: &mut Session,
    stamp: &Stamp<'_>,
    status: u16,
    location: &str,
) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(4))?;
    header.insert_header("location", location)?;
    send(session, stamp, header, Bytes::new()).await
}

/// The error page's one inline style. The security headers' Content-Security-Policy allows it
/// by its hash ([`crate::header_rules::security_headers`]), so it must stay a constant.
pub const ERROR_PAGE_STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;max-width:36rem;\
    margin:4rem auto;padding:0 1rem;color:#1f2933}small{color:#7b8794}";

fn header_with(
    status: u16,
    content_type: &str,
    extra: &[(&'static str, &str)],
) -> Result<ResponseHeader> {
    let mut header = ResponseHeader::build(status, Some(4 + extra.len()))?;
    header.insert_header("content-type", content_type)?;
    for (name, value) in extra {
        header.insert_header(*name, *value)?;
    }
    Ok(header)
}

/// Writes a whole response from memory.
pub async fn send(
    session: &mut Session,
    stamp: &Stamp<'_>,
    header: ResponseHeader,
    body: Bytes,
) -> Result<()> {
    if send_head(session, stamp, header, Some(body.len() as u64)).await? {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Writes the header of a `len`-byte response with the stamp; returns whether a body should
/// follow (not for HEAD, not when empty). `None`: no body and no `Content-Length` (a 304).
pub async fn send_head(
    session: &mut Session,
    stamp: &Stamp<'_>,
    mut header: ResponseHeader,
    len: Option<u64>,
) -> Result<bool> {
    if let Some(len) = len {
        header.insert_header("content-length", len.to_string())?;
    }
    stamp.apply(&mut header)?;
    let head_only = len.unwrap_or(0) == 0 || session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    Ok(!head_only)
}

/// How much of an HTTP/2 request's body is read, and for how long, after the proxy answered
/// before the body arrived.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(1);

/// After an answer given before an HTTP/2 request's body was read (a `403`, a `401`, a `429`
/// to a `POST`): a small body still on its way is read and dropped, so that its stream ends
/// cleanly. Otherwise the stream is reset with `NO_ERROR`, which RFC 9113 (8.1) allows but
/// which curl 7.x reports as error 92 in place of the answer when its upload had not
/// finished. A bigger or slower body still has its stream reset, at these bounds (nginx
/// lingers on HTTP/1 connections for the same reason). On HTTP/1 an unread body ends the
/// whole connection instead, as Pingora decides.
pub async fn linger_h2(session: &mut Session) {
    if !session.is_http2() || session.is_body_done() {
        return;
    }
    let discard = async {
        let mut read = 0;
        while read < LINGER_BYTES {
            match session.read_request_body().await {
                Ok(Some(chunk)) => read += chunk.len(),
                Ok(None) | Err(_) => break,
            }
        }
    };
    // The bound is the point: a body not read by then is simply left.
    let _ = tokio::time::timeout(LINGER_TIME, discard).await;
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
