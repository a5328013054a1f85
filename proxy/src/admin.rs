//! The admin listener (loopback by default, never a public port unless configured):
//!
//! - `/metrics`: one Prometheus scrape for the whole group: the proxy's series, each
//!   backend's (fetched over its admin socket, labelled `backend`) and the supervisor's
//!   (from the file it keeps in the runtime directory);
//! - `/healthz`: the proxy is alive;
//! - `/readyz`: at least one backend answers and Redis is reachable (503 otherwise);
//! - `/status`: the backends in rotation and the requests answered so far, as JSON (what the
//!   API's `GET /api/status` shows admins);
//! - `DELETE /cache?path=...` or `?prefix=...` (and `&host=...`): removes kept backend
//!   responses ([`crate::cache`]). `DELETE`, not `POST`: a web page cannot make a browser
//!   send it to this listener without a CORS preflight, which is refused.

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use http::Response;
use pingora::{
    apps::http_app::ServeHttp,
    lb::{LoadBalancer, selection::RoundRobin},
    protocols::http::ServerSession,
};
use prometheus::{Encoder, TextEncoder};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

use arc_swap::ArcSwap;

use crate::{live::Live, metrics::Metrics, upstream};

/// How long a backend may take to answer the admin listener.
const BACKEND_DEADLINE: Duration = Duration::from_secs(2);

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub lb: Arc<LoadBalancer<RoundRobin>>,
    pub live: Arc<ArcSwap<Live>>,
    /// The supervisor's series, rewritten by it every second.
    pub supervisor_file: PathBuf,
    /// Ports of the public listeners, for the open-connections gauge.
    pub public_ports: Vec<u16>,
    pub cache: Arc<crate::cache::Store>,
}

impl Admin {
    /// The backends in the pool now: listed, or found in `upstream.socket_dir`.
    fn backends(&self) -> Vec<Arc<upstream::Member>> {
        let current = self.lb.backends().get_backend();
        current
            .iter()
            .filter_map(upstream::member)
            .cloned()
            .collect()
    }

    async fn render_metrics(&self) -> Vec<u8> {
        // Backends found in a socket directory come and go: only the current ones are shown,
        // or a replaced one would read as down for the life of the proxy.
        self.metrics.backend_up.reset();
        for backend in self.lb.backends().get_backend().iter() {
            if let Some(member) = upstream::member(backend) {
                let up = self.lb.backends().ready(backend);
                self.metrics
                    .backend_up
                    .with_label_values(&[member.id.as_ref()])
                    .set(i64::from(up));
            }
        }
        self.metrics
            .open_connections
            .set(crate::metrics::established_connections(&self.public_ports));
        self.metrics.cache_bytes.set(self.cache.bytes() as i64);
        self.metrics.cache_entries.set(self.cache.entries() as i64);
        for (policy, keys) in self.live.load().routes.rate_limit_keys() {
            self.metrics
                .rate_limit_keys
                .with_label_values(&[policy])
                .set(keys as i64);
        }
        let mut out = Vec::with_capacity(32 * 1024);
        if let Err(error) = TextEncoder::new().encode(&self.metrics.registry.gather(), &mut out) {
            tracing::error!(%error, "cannot encode metrics");
        }
        let scrapes = self
            .backends()
            .into_iter()
            .filter_map(|b| b.admin_socket.clone())
            .map(|socket| async move {
                match get(&socket, "/metrics").await {
                    Some((200, body)) => String::from_utf8(body).ok(),
                    _ => None,
                }
            });
        let texts: Vec<String> = join_all(scrapes).await.into_iter().flatten().collect();
        out.extend_from_slice(merge_families(&texts).as_bytes());
        // The supervisor rewrites it every second; an old file is from a supervisor that is gone.
        let fresh = tokio::fs::metadata(&self.supervisor_file)
            .await
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < Duration::from_secs(5)));
        if fresh && let Ok(text) = tokio::fs::read(&self.supervisor_file).await {
            out.extend_from_slice(&text);
        }
        out
    }

    /// The pool as the proxy's health checks see it now, with no request of its own to the
    /// backends (unlike `/readyz`), and the requests answered so far.
    fn status(&self) -> serde_json::Value {
        let backends = self.lb.backends().get_backend();
        let in_rotation = backends
            .iter()
            .filter(|b| self.lb.backends().ready(b))
            .count();
        serde_json::json!({
            "backends": { "in_rotation": in_rotation, "total": backends.len() },
            "requests_total": self.metrics.requests_total(),
        })
    }

    async fn readiness(&self) -> (bool, serde_json::Value) {
        let checks = self.backends().into_iter().map(|b| async move {
            let answer = get(&b.socket, "/healthz").await;
            let health = answer
                .filter(|(status, _)| *status == 200)
                .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok());
            (b.id.to_string(), health)
        });
        let results = join_all(checks).await;
        let redis_up = results
            .iter()
            .any(|(_, h)| h.as_ref().is_some_and(|h| h["redis"] == "up"));
        let backends: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(id, h)| (id.clone(), if h.is_some() { "up" } else { "down" }.into()))
            .collect();
        let any_backend = results.iter().any(|(_, h)| h.is_some());
        let ready = any_backend && redis_up;
        let body = serde_json::json!({
            "ready": ready,
            "backends": backends,
            "redis": if redis_up { "up" } else if any_backend { "down" } else { "unknown" },
        });
        (ready, body)
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/metrics" => (
                200,
                "text/plain; version=0.0.4",
                self.render_metrics().await,
            ),
            "/healthz" => (200, "application/json", br#"{"status":"ok"}"#.to_vec()),
            "/status" => (200, "application/json", self.status().to_string().into_bytes()),
            "/cache" => {
                let request = session.req_header();
                let (status, body) = purge(&self.cache, &request.method, request.uri.query());
                (status, "application/json", body.to_string().into_bytes())
            }
            "/readyz" => {
                let (ready, body) = self.readiness().await;
                let status = if ready { 200 } else { 503 };
                (status, "application/json", body.to_string().into_bytes())
            }
            _ => (
                404,
                "application/json",
                br#"{"error":"not_found","message":"the admin listener serves /metrics, /healthz, /readyz, /status and /cache"}"#
                    .to_vec(),
            ),
        };
        let mut response = Response::builder();
        if status == 405 {
            response = response.header("allow", "DELETE");
        }
        response
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .header("cache-control", "no-store")
            .body(body)
            .unwrap_or_default()
    }
}

/// `DELETE /cache` with `path` (one URL: path and query) or `prefix` (every path under
/// it), and optionally `host`, form-encoded in the query.
fn purge(
    cache: &crate::cache::Store,
    method: &http::Method,
    query: Option<&str>,
) -> (u16, serde_json::Value) {
    use crate::cache::Purge;
    let error = |status, code: &str, message: &str| {
        (
            status,
            serde_json::json!({"error": code, "message": message}),
        )
    };
    if method != http::Method::DELETE {
        return error(405, "method_not_allowed", "purge with DELETE");
    }
    let (mut path, mut prefix, mut host) = (None, None, None);
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "path" => path = Some(value),
            "prefix" => prefix = Some(value),
            "host" => host = Some(value),
            _ => {
                return error(
                    400,
                    "bad_request",
                    "the parameters are path or prefix, and host",
                );
            }
        }
    }
    let target = match (&path, &prefix) {
        (Some(path), None) if path.starts_with('/') => Purge::Target(path.as_bytes()),
        (None, Some(prefix)) if prefix.starts_with('/') => Purge::Prefix(prefix.as_bytes()),
        _ => {
            let message = "give one of path (a path and query) or prefix, starting with /";
            return error(400, "bad_request", message);
        }
    };
    let purged = cache.purge(host.as_deref(), target);
    tracing::info!(?path, ?prefix, ?host, purged, "cache purged");
    (200, serde_json::json!({ "purged": purged }))
}

/// Runs each future as its own task, so they overlap, and returns their outputs in order.
async fn join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(value) = task.await {
            out.push(value);
        }
    }
    out
}

/// One HTTP/1.1 GET over a Unix socket: the status and the body, or `None` on any failure
/// or past [`BACKEND_DEADLINE`].
async fn get(socket: &std::path::Path, path: &str) -> Option<(u16, Vec<u8>)> {
    unix_request(socket, "GET", path, None).await
}

/// One HTTP/1.1 request over a Unix socket, with a JSON body when given: the status and the
/// body, or `None` on any failure or past [`BACKEND_DEADLINE`].
pub(crate) async fn unix_request(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    json: Option<&[u8]>,
) -> Option<(u16, Vec<u8>)> {
    // Found in a directory others write to: a symbolic link there could name any socket the
    // proxy can reach.
    if !crate::socket_dir::is_socket(socket) {
        return None;
    }
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.ok()?;
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(body) = json {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(json.unwrap_or_default());
        stream.write_all(&bytes).await.ok()?;
        let mut response = Vec::with_capacity(16 * 1024);
        stream.read_to_end(&mut response).await.ok()?;
        let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
        let status = std::str::from_utf8(response.get(9..12)?)
            .ok()?
            .parse()
            .ok()?;
        Some((status, response.split_off(split + 4)))
    };
    tokio::time::timeout(BACKEND_DEADLINE, exchange)
        .await
        .ok()
        .flatten()
}

/// Merges Prometheus text expositions whose families repeat (one per backend): each family's
/// `# HELP` and `# TYPE` once, then the samples of every input.
fn merge_families(texts: &[String]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut families: std::collections::HashMap<&str, (Vec<&str>, Vec<&str>)> =
        std::collections::HashMap::new();
    for text in texts {
        let mut current = "";
        for line in text.lines() {
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or(line.strip_prefix("# TYPE "))
            {
                current = rest.split_whitespace().next().unwrap_or_default();
                let family = families.entry(current).or_insert_with(|| {
                    order.push(current);
                    Default::default()
                });
                if family.0.len() < 2 && !family.0.contains(&line) {
                    family.0.push(line);
                }
            } else if !line.is_empty() && !line.starts_with('#') {
                families.entry(current).or_default().1.push(line);
            }
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some((meta, samples)) = families.get(name) {
            for line in meta.iter().chain(samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_several_backends_are_merged() {
        let one = "# HELP up Up.\n# TYPE up gauge\nup{backend=\"b1\"} 1\n# HELP n N.\n# TYPE n counter\nn{backend=\"b1\"} 3\n";
        let two = one.replace("b1", "b2");
        let merged = merge_families(&[one.to_string(), two]);
        assert_eq!(
            merged,
            "# HELP up Up.\n# TYPE up gauge\nup{backend=\"b1\"} 1\nup{backend=\"b2\"} 1\n\
             # HELP n N.\n# TYPE n counter\nn{backend=\"b1\"} 3\nn{backend=\"b2\"} 3\n"
        );
    }
}
