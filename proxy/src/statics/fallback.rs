//! A static route's own error pages (`error_pages`) and its fallback file (`fallback`, for
//! single-page apps that route on the client).
//!
//! Both name files below the route's directory, checked when the config is loaded and then
//! read through the route's cache like any other file, so an edit is served within the check
//! interval. A page that has gone missing since is replaced by the built-in one: the client
//! still gets the right status.

use std::sync::Arc;

use pingora::{Result, http::ResponseHeader};
use pingora_proxy::Session;

use super::{Body, Site, cache::Asset, cache::Found, send, variant};
use crate::{
    encoding::{self, Encoding},
    respond::Stamp,
};

/// Statuses a route may give its own page for: the ones the edge answers on a route with an
/// error page (a missing file, and the access rules' refusals).
pub const PAGE_STATUSES: [u16; 4] = [401, 403, 404, 429];

/// A route's error pages and fallback file, as paths below its (canonical) directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SitePages {
    /// Status and file; only [`PAGE_STATUSES`].
    pub errors: Vec<(u16, String)>,
    pub fallback: Option<String>,
}

/// Whether a request path that found no file takes the fallback: only when its last segment
/// has no extension. `/app/users/42` is a client-side route; `/app/main.3f2a.js` is a missing
/// asset, and HTML in its place would only fail later and more obscurely.
pub fn takes_fallback(decoded: &str) -> bool {
    let last = decoded.rsplit('/').next().unwrap_or("");
    !last.contains('.')
}

impl Site {
    /// The route's fallback file for `decoded`, when it has one and the path takes it.
    pub(super) async fn fallback(&self, decoded: &str) -> Option<Arc<Asset>> {
        let name = self.pages.fallback.as_deref()?;
        if !takes_fallback(decoded) {
            return None;
        }
        match self.find(name).await.0 {
            Found::File(asset) => Some(asset),
            _ => None,
        }
    }

    /// Answers with the route's page for `status` (a browser asked); `Ok(false)` when the
    /// route has none, so the caller sends the built-in one. The status stays the error's;
    /// no validators, as the page is not what the address holds.
    pub async fn send_error_page(
        &self,
        session: &mut Session,
        stamp: &Stamp<'_>,
        status: u16,
        extra: &[(&'static str, &str)],
    ) -> Result<bool> {
        let Some((_, name)) = self.pages.errors.iter().find(|(s, _)| *s == status) else {
            return Ok(false);
        };
        let Found::File(asset) = self.find(name).await.0 else {
            return Ok(false);
        };
        let compress = asset.compressible && asset.held && asset.len >= self.min_compress_bytes;
        let wanted = if compress {
            let accept = session.req_header().headers.get("accept-encoding");
            encoding::negotiate(accept.map(|v| v.as_bytes()))
        } else {
            Encoding::Identity
        };
        let compressed = match wanted {
            Encoding::Identity => None,
            wanted => variant(&asset, wanted).await.map(|bytes| (wanted, bytes)),
        };
        let mut header = ResponseHeader::build(status, Some(4 + extra.len()))?;
        header.insert_header("content-type", asset.mime)?;
        for (name, value) in extra {
            header.insert_header(*name, *value)?;
        }
        if compress {
            // Beside the `Vary: Accept` the caller set.
            header.append_header("vary", "Accept-Encoding")?;
        }
        let body = match compressed {
            Some((encoding, bytes)) => {
                header.insert_header("content-encoding", encoding.token())?;
                Body::Memory(bytes)
            }
            None => Body::slice(&asset, 0, asset.len),
        };
        send(session, stamp, header, body).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_without_an_extension_take_the_fallback() {
        assert!(takes_fallback("/app/some/deep/route"));
        assert!(takes_fallback("/app/some/deep/route/"));
        assert!(takes_fallback("/app/"));
        assert!(!takes_fallback("/app/assets/main.3f2a.js"));
        assert!(!takes_fallback("/app/favicon.ico"));
    }
}
