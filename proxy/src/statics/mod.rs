//! Static sites: files under a route's directory, served like a web server should.
//!
//! - [`cache`]: files held in memory per version, checked with one `stat` per request.
//! - [`conditional`]: ETags, `If-None-Match`, `If-Modified-Since`, `Range`, `If-Range`.
//! - [`fallback`]: the route's own error pages and its fallback file for client-side routing.
//!
//! The request path was decoded and guarded before routing ([`crate::path`]); the variants
//! are made with [`crate::encoding`]. Dotfiles are never served.

pub mod cache;
pub mod conditional;
pub mod fallback;

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;
use http::Method;
use pingora::{Error, ErrorType, Result, http::ResponseHeader};
use pingora_proxy::Session;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::{
    encoding::{self, Encoding},
    error::BuildError,
    metrics::RouteSeries,
    respond::{self, Stamp},
};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

/// Characters that cannot stand in a path segment of a `Location` header.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'/')
    .add(b'\\');
use cache::{Asset, Files, Found};
use conditional::Range;
use fallback::SitePages;

/// How static files are served, shared by every static route.
#[derive(Debug, Clone)]
pub struct StaticSettings {
    /// Memory for cached files and their compressed variants, across all static routes.
    pub cache_bytes: u64,
    /// Files larger than this are streamed from disk, uncompressed.
    pub max_cached_file_bytes: u64,
    /// Smaller files are not worth compressing.
    pub min_compress_bytes: u64,
    /// How long a cached file is served before it is compared with the disk again; zero:
    /// at every request.
    pub check_interval: std::time::Duration,
}

/// One static route.
pub struct Site {
    files: Files,
    cache_control: Option<String>,
    min_compress_bytes: u64,
    pages: SitePages,
}

impl Site {
    /// `dir` must exist; it is made canonical so symlinks can be checked against it.
    pub fn new(
        dir: &std::path::Path,
        cache_control: Option<String>,
        pages: SitePages,
        settings: &StaticSettings,
        sites: usize,
    ) -> Result<Site, BuildError> {
        let root: PathBuf = dir
            .canonicalize()
            .map_err(|source| BuildError::StaticDirectory {
                dir: dir.to_owned(),
                source,
            })?;
        let share = settings.cache_bytes / sites.max(1) as u64;
        Ok(Site {
            files: Files::new(
                root,
                share,
                settings.max_cached_file_bytes,
                settings.check_interval,
            )?,
            cache_control,
            min_compress_bytes: settings.min_compress_bytes,
            pages,
        })
    }

    /// The file at `relative`, from the cache or the disk, and whether the cache had it.
    async fn find(&self, relative: &str) -> (Found, bool) {
        if let Some(asset) = self.files.cached(relative) {
            return (Found::File(asset), true);
        }
        let _turn = FILE_READS.acquire().await;
        // Another request may have loaded it while this one waited.
        if let Some(asset) = self.files.cached(relative) {
            return (Found::File(asset), false);
        }
        // A miss reads the file: off the async threads.
        let (files, wanted) = (self.files.clone(), relative.to_owned());
        let found = tokio::task::spawn_blocking(move || files.load(&wanted))
            .await
            .unwrap_or(Found::Missing);
        (found, false)
    }

    /// Answers a request under `prefix`; `decoded` has passed [`crate::path::check`].
    pub async fn serve(
        &self,
        session: &mut Session,
        stamp: &Stamp<'_>,
        prefix: &str,
        decoded: &str,
        series: Option<&RouteSeries>,
    ) -> Result<u16> {
        let method = session.req_header().method.clone();
        if method != Method::GET && method != Method::HEAD {
            let message = "static files answer GET and HEAD only";
            let allow = [("allow", "GET, HEAD")];
            respond::json_error_with(session, stamp, 405, "method_not_allowed", message, &allow)
                .await?;
            return Ok(405);
        }
        let Some(relative) = relative(decoded, prefix) else {
            return not_found(session, stamp).await;
        };
        let (found, hit) = self.find(&relative).await;
        let (asset, cache_control) = match found {
            Found::File(asset) => (asset, self.cache_control.as_deref()),
            // The app's shell may change with every deployment while its addresses stay:
            // always revalidated (cheaply, by its ETag), whatever the route's cache_control.
            Found::Missing => match self.fallback(decoded).await {
                Some(asset) => (asset, Some("no-cache")),
                None => return not_found(session, stamp).await,
            },
            Found::Refused => return not_found(session, stamp).await,
            Found::Directory => {
                // `/open/docs` -> `/open/docs/`, built from the normalised path (never from the
                // raw one, so `//evil.example` cannot become a protocol-relative redirect).
                let mut location = String::from(prefix);
                for segment in relative.split('/') {
                    location.extend(utf8_percent_encode(segment, SEGMENT));
                    location.push('/');
                }
                if let Some(query) = session.req_header().uri.query() {
                    location.push('?');
                    location.push_str(query);
                }
                respond::redirect(session, stamp, 301, &location).await?;
                return Ok(301);
            }
        };
        let (status, encoding) = self.send_file(session, stamp, asset, cache_control).await?;
        if let Some(series) = series {
            series.static_response(encoding, hit);
        }
        Ok(status)
    }

    async fn send_file(
        &self,
        session: &mut Session,
        stamp: &Stamp<'_>,
        asset: Arc<Asset>,
        cache_control: Option<&str>,
    ) -> Result<(u16, Encoding)> {
        let headers = &session.req_header().headers;
        let range_header = headers.get("range").map(|v| v.as_bytes().to_vec());
        // Only files the cache holds are compressed: their variants are made once, not per request.
        let compress = asset.compressible && asset.held && asset.len >= self.min_compress_bytes;
        // A range names bytes of the file itself, so ranged requests are served uncompressed.
        let wanted = if compress && range_header.is_none() {
            encoding::negotiate(headers.get("accept-encoding").map(|v| v.as_bytes()))
        } else {
            Encoding::Identity
        };
        let (encoding, compressed) = match wanted {
            Encoding::Identity => (Encoding::Identity, None),
            wanted => match variant(&asset, wanted).await {
                Some(bytes) => (wanted, Some(bytes)),
                None => (Encoding::Identity, None),
            },
        };
        let etag = asset.etag(encoding);

        let headers = &session.req_header().headers;
        let unchanged = match headers.get("if-none-match") {
            Some(tags) => conditional::none_match(tags.as_bytes(), etag),
            None => headers.get("if-modified-since").is_some_and(|since| {
                conditional::not_modified_since(since.as_bytes(), asset.modified())
            }),
        };
        let mut range = match &range_header {
            Some(value) if encoding == Encoding::Identity => conditional::range(value, asset.len),
            _ => Range::Full,
        };
        if range != Range::Full
            && let Some(if_range) = headers.get("if-range")
            && !conditional::if_range_holds(if_range.as_bytes(), etag, &asset.last_modified)
        {
            range = Range::Full;
        }

        let status = match (unchanged, &range) {
            (true, _) => 304,
            (false, Range::Full) => 200,
            (false, Range::Part(..)) => 206,
            (false, Range::Unsatisfiable) => 416,
        };
        let mut header = ResponseHeader::build(status, Some(10))?;
        header.insert_header("etag", etag)?;
        header.insert_header("last-modified", &asset.last_modified)?;
        if let Some(cache_control) = cache_control {
            header.insert_header("cache-control", cache_control)?;
        }
        if compress {
            header.insert_header("vary", "Accept-Encoding")?;
        }
        if status == 304 {
            // No Content-Length: on a 304 it would have to be the full response's.
            respond::send_head(session, stamp, header, None).await?;
            return Ok((304, encoding));
        }
        header.insert_header("content-type", asset.mime)?;
        header.insert_header("accept-ranges", "bytes")?;
        if encoding != Encoding::Identity {
            header.insert_header("content-encoding", encoding.token())?;
        }
        let body = match (range, compressed) {
            (_, Some(bytes)) => Body::Memory(bytes),
            (Range::Unsatisfiable, None) => {
                header.insert_header("content-range", format!("bytes */{}", asset.len))?;
                Body::Memory(Bytes::new())
            }
            (Range::Part(first, last), None) => {
                header.insert_header(
                    "content-range",
                    format!("bytes {first}-{last}/{}", asset.len),
                )?;
                Body::slice(&asset, first, last - first + 1)
            }
            (Range::Full, None) => Body::slice(&asset, 0, asset.len),
        };
        send(session, stamp, header, body)
            .await
            .map(|()| (status, encoding))
    }
}

/// File reads and compressions run on the blocking pool, at most this many of each at once.
/// Unbounded, a burst of clients asking for a cold file would start a thread each (64
/// clients: 64 threads and 50 MB more memory), all but one waiting for the same result.
/// Separate, so a slow brotli compression never holds up a file read or a 404.
static FILE_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
static COMPRESSIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The compressed variant, made off the async threads the first time.
async fn variant(asset: &Arc<Asset>, encoding: Encoding) -> Option<Bytes> {
    if asset.variant_ready(encoding) {
        return asset.variant(encoding);
    }
    let _turn = COMPRESSIONS.acquire().await;
    if asset.variant_ready(encoding) {
        return asset.variant(encoding);
    }
    let worker = asset.clone();
    tokio::task::spawn_blocking(move || worker.variant(encoding))
        .await
        .ok()?
}

async fn not_found(session: &mut Session, stamp: &Stamp<'_>) -> Result<u16> {
    respond::error_for_client(
        session,
        stamp,
        404,
        "not_found",
        "there is no file at this address",
    )
    .await?;
    Ok(404)
}

/// The file path below a route's directory for a decoded request path; `None` when a segment
/// is a dotfile. Empty segments are dropped, so `//etc/passwd` stays below the root.
pub fn relative(decoded: &str, prefix: &str) -> Option<String> {
    let rest = decoded.strip_prefix(prefix)?;
    let mut relative = String::with_capacity(rest.len() + 10);
    // Empty segments (doubled slashes) are dropped: `/open//a` is `/open/a`, one cache entry.
    for segment in rest.split('/').filter(|s| !s.is_empty()) {
        if segment.starts_with('.') {
            return None;
        }
        if !relative.is_empty() {
            relative.push('/');
        }
        relative.push_str(segment);
    }
    // A path that names a directory (`/open/`, `/open/docs/`) means its index page.
    if relative.is_empty() || rest.ends_with('/') {
        if !relative.is_empty() {
            relative.push('/');
        }
        relative.push_str("index.html");
    }
    Some(relative)
}

enum Body {
    Memory(Bytes),
    /// A file too large to cache: `len` bytes from `offset`, read as they are sent.
    Disk {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl Body {
    fn slice(asset: &Asset, offset: u64, len: u64) -> Body {
        match &asset.identity {
            Some(bytes) => Body::Memory(bytes.slice(offset as usize..(offset + len) as usize)),
            None => Body::Disk {
                path: asset.path.clone(),
                offset,
                len,
            },
        }
    }

    fn len(&self) -> u64 {
        match self {
            Body::Memory(bytes) => bytes.len() as u64,
            Body::Disk { len, .. } => *len,
        }
    }
}

async fn send(
    session: &mut Session,
    stamp: &Stamp<'_>,
    header: ResponseHeader,
    body: Body,
) -> Result<()> {
    if !respond::send_head(session, stamp, header, Some(body.len())).await? {
        return Ok(());
    }
    match body {
        Body::Memory(bytes) => session.write_response_body(Some(bytes), true).await,
        Body::Disk {
            path,
            offset,
            mut len,
        } => {
            // File errors, not `ReadError`: that is a client's failure, kept out of the error
            // log, and a failing disk must show there.
            let read_error = |e: std::io::Error| {
                Error::because(ErrorType::FileReadError, "reading a static file", e)
            };
            let mut file = tokio::fs::File::open(&path).await.map_err(|e| {
                Error::because(ErrorType::FileOpenError, "opening a static file", e)
            })?;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(read_error)?;
            while len > 0 {
                let mut chunk = vec![0u8; len.min(64 * 1024) as usize];
                let n = file.read(&mut chunk).await.map_err(read_error)?;
                if n == 0 {
                    // The file shrank under us; the client sees a short body and retries.
                    return Error::e_explain(
                        ErrorType::FileReadError,
                        "static file shorter than announced",
                    );
                }
                chunk.truncate(n);
                len -= n as u64;
                session
                    .write_response_body(Some(Bytes::from(chunk)), len == 0)
                    .await?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_and_dotfiles() {
        assert_eq!(relative("/open/", "/open/").unwrap(), "index.html");
        assert_eq!(relative("/open/a/b.css", "/open/").unwrap(), "a/b.css");
        assert_eq!(
            relative("/open/docs/", "/open/").unwrap(),
            "docs/index.html"
        );
        assert!(relative("/open/.env", "/open/").is_none());
        assert!(relative("/open/a/.git/config", "/open/").is_none());
        assert_eq!(
            relative("/open/docs//a.css", "/open/").unwrap(),
            "docs/a.css"
        );
        assert_eq!(
            relative("/open//etc/passwd", "/open/").unwrap(),
            "etc/passwd"
        );
        assert_eq!(
            relative("/open/docs//", "/open/").unwrap(),
            "docs/index.html"
        );
    }
}
