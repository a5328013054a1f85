//! The audit log: security events (sign-ins, changes to users and keys, refusals, reloads and
//! upgrades), each one JSON object with its time, event, actor, client, request and
//! correlation ids, target and outcome, never a secret.
//!
//! Each event goes to two places: a line appended to the audit file (every process of the
//! group appends to the same file; one `write` per line on a file opened for appending keeps
//! lines whole), and an entry of a Redis stream capped near `audit.max_events`, which every
//! backend and replica shares and `GET /api/audit` reads, newest first. Either may fail alone
//! (a full disk, Redis down): the event is still in the other, the failure is counted, and the
//! event is also logged at `warn`, so it is never lost silently.
//!
//! The file is written by a thread of its own, fed through a bounded queue: a slow disk, or a
//! standard output nobody reads, never holds a request (the backend serves on one thread). A
//! file renamed away (by logrotate) is followed by a new one at the next event.
//!
//! Refusals an attacker can cause by the thousand (a throttled login, a bad key, a denied
//! permission) are written once per event, client (IPv6 by /64, as the login guard counts) and
//! actor in [`REPEAT_WINDOW`], and at most [`MAX_REFUSALS`] of them in a window: the rest are
//! counted, not written, so one client flooding costs Redis one write per window, not one per
//! request. (Many clients at once can still write the budget every window, which turns the
//! stream over in time; the file keeps everything.)

use std::{
    collections::HashMap,
    fs::File,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{error::ApiError, guard::client_part, keys::AUDIT, metrics::Metrics, store::Store};

/// The default of `audit.max_events`.
pub const DEFAULT_MAX_EVENTS: u64 = 100_000;
/// The most events `GET /api/audit` returns at once.
pub const MAX_PAGE: usize = 500;
/// A repeated refusal (same event, client and actor) within this is not written again.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(10);
/// Refusals one process writes in a [`REPEAT_WINDOW`] at most, whoever they come from.
pub const MAX_REFUSALS: u32 = 100;
/// Lines waiting for the file's writer; past it, a line is counted as a failure.
const QUEUE: usize = 4096;

/// One security event. Borrowed fields: built on the request's path from what it has.
#[derive(Debug, Default, Serialize)]
pub struct Event<'a> {
    pub event: &'a str,
    /// Who did it: a user name, `key:NAME` for an API key, `gatehouse` for the group itself.
    pub actor: Option<&'a str>,
    pub client: Option<IpAddr>,
    pub request_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    /// What it was done to: a user name, a key, a route.
    pub target: Option<&'a str>,
    /// `success`, `failure` or `denied`.
    pub outcome: &'a str,
    /// A few words more, e.g. the fields a change touched or the role a refusal needed.
    pub detail: Option<&'a str>,
}

/// An event as written: the event and where and when.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a Event<'a>,
    /// The process that wrote it: a backend id, or `gatehouse` for the supervisor.
    source: &'a str,
}

/// Who a refusal came from, for [`Audit::record_refusal`]: event, client, actor.
type Refusal = (String, String, String);

/// The refusals of the current window.
struct Refusals {
    since: Instant,
    written: u32,
    last: HashMap<Refusal, Instant>,
}

pub struct Audit {
    store: Arc<Store>,
    /// The file writer's queue; `None`: no file.
    lines: Option<mpsc::SyncSender<String>>,
    max_events: u64,
    source: String,
    metrics: Option<Arc<Metrics>>,
    refusals: Mutex<Refusals>,
}

impl Audit {
    /// `file`: the audit file (`-`: standard output), opened for appending now (created if
    /// missing, `0600`), so a path that cannot be written stops the start rather than losing
    /// events later.
    pub fn new(
        store: Arc<Store>,
        file: Option<&Path>,
        max_events: u64,
        source: &str,
        metrics: Option<Arc<Metrics>>,
    ) -> std::io::Result<Self> {
        let sink = match file {
            // Standard output: a container's log, beside the access log's JSON lines.
            Some(path) if path == Path::new("-") => Some(Sink::Stdout),
            Some(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Some(Sink::File(path.to_path_buf(), open(path)?))
            }
            None => None,
        };
        let lines = match sink {
            Some(sink) => {
                let (sender, receiver) = mpsc::sync_channel(QUEUE);
                let metrics = metrics.clone();
                std::thread::Builder::new()
                    .name("audit-file".into())
                    .spawn(move || sink.write_all(receiver, metrics))?;
                Some(sender)
            }
            None => None,
        };
        Ok(Self {
            store,
            lines,
            max_events: max_events.max(1),
            source: source.to_string(),
            metrics,
            refusals: Mutex::new(Refusals {
                since: Instant::now(),
                written: 0,
                last: HashMap::new(),
            }),
        })
    }

    /// Writes `event` to the file and the stream. Never fails the request: a sink that fails
    /// is counted and logged.
    pub async fn record(&self, event: Event<'_>) {
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event: &event,
            source: &self.source,
        };
        let Ok(json) = serde_json::to_string(&line) else {
            return;
        };
        self.count(Metrics::audit_event);
        let queued = match &self.lines {
            Some(lines) => lines.try_send(json.clone()).is_ok(),
            None => true,
        };
        let mut conn = self.store.connection();
        let max = self.max_events;
        let stream_ok = self
            .store
            .bounded(async {
                redis::cmd("XADD")
                    .arg(AUDIT)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(max)
                    .arg("*")
                    .arg("e")
                    .arg(&json)
                    .query_async::<String>(&mut conn)
                    .await
            })
            .await
            .is_ok();
        if !(queued && stream_ok) {
            self.count(Metrics::audit_failure);
            tracing::warn!(audit = %json, file = queued, stream = stream_ok,
                "an audit event could not be written everywhere");
        }
    }

    /// As [`Audit::record`], unless [`Audit::admit_refusal`] says no.
    pub async fn record_refusal(&self, event: Event<'_>) {
        if self.admit_refusal(event.event, event.client, event.actor) {
            self.record(event).await;
        }
    }

    /// Whether a refusal is to be written: not when the same one (event, client, actor) was
    /// within [`REPEAT_WINDOW`], nor past [`MAX_REFUSALS`] in this window; those are counted
    /// (`gatehouse_backend_audit_suppressed_total`). Decided at once, so a caller on a
    /// request's path can ask before spending anything on the event.
    pub fn admit_refusal(&self, event: &str, client: Option<IpAddr>, actor: Option<&str>) -> bool {
        let key = (
            event.to_string(),
            client_part(client),
            actor.unwrap_or_default().to_string(),
        );
        let mut refusals = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(refusals.since) >= REPEAT_WINDOW {
            refusals.since = now;
            refusals.written = 0;
            refusals
                .last
                .retain(|_, at| now.duration_since(*at) < REPEAT_WINDOW);
        }
        let repeated = refusals
            .last
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < REPEAT_WINDOW);
        let write = !repeated && refusals.written < MAX_REFUSALS;
        if write {
            refusals.written += 1;
            refusals.last.insert(key, now);
        } else {
            self.count(Metrics::audit_suppressed);
        }
        write
    }

    fn count(&self, counter: fn(&Metrics)) {
        if let Some(metrics) = &self.metrics {
            counter(metrics);
        }
    }

    /// The newest events first, at most `limit`, older than stream id `before` if given;
    /// each event's JSON with its stream `id` added, and the id of the last entry read (the
    /// next page's `before`), also when that entry could not be read as an event.
    pub async fn page(
        &self,
        limit: usize,
        before: Option<&str>,
    ) -> Result<(Vec<serde_json::Value>, Option<String>), ApiError> {
        let end = match before {
            // Nothing is older than the first id there can be (and Redis refuses the range).
            Some(id) if id.split('-').all(|n| n.parse() == Ok(0u64)) => {
                return Ok((Vec::new(), None));
            }
            Some(id) => format!("({id}"),
            None => "+".to_string(),
        };
        let limit = limit.clamp(1, MAX_PAGE);
        let mut conn = self.store.connection();
        let entries: Vec<(String, Vec<(String, String)>)> = self
            .store
            .bounded(async {
                redis::cmd("XREVRANGE")
                    .arg(AUDIT)
                    .arg(&end)
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let last = (entries.len() == limit)
            .then(|| entries.last().map(|(id, _)| id.clone()))
            .flatten();
        let events = entries
            .into_iter()
            .filter_map(|(id, fields)| {
                let json = fields.into_iter().find(|(k, _)| k == "e")?.1;
                let mut event: serde_json::Value = serde_json::from_str(&json).ok()?;
                event
                    .as_object_mut()?
                    .insert("id".into(), serde_json::Value::String(id));
                Some(event)
            })
            .collect();
        Ok((events, last))
    }
}

/// Where the audit file's writer writes.
enum Sink {
    Stdout,
    File(PathBuf, File),
}

impl Sink {
    /// The writer thread: each line in one `write`, until every sender is gone. A file is
    /// opened again when the path names another file than the one held (logrotate renamed it
    /// away: events are few, so a `stat` each costs nothing and needs no signal to every
    /// process), or when a write fails.
    fn write_all(mut self, lines: mpsc::Receiver<String>, metrics: Option<Arc<Metrics>>) {
        for mut line in lines {
            line.push('\n');
            if !self.write(line.as_bytes()) {
                if let Some(metrics) = &metrics {
                    metrics.audit_failure();
                }
                tracing::warn!(audit = %line.trim_end(), "an audit event could not be written to the audit file");
            }
        }
    }

    fn write(&mut self, line: &[u8]) -> bool {
        use std::os::unix::fs::MetadataExt;
        match self {
            Sink::Stdout => std::io::stdout().lock().write_all(line).is_ok(),
            Sink::File(path, file) => {
                let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
                    a.dev() == b.dev() && a.ino() == b.ino()
                };
                let moved = match (std::fs::metadata(&*path), file.metadata()) {
                    (Ok(named), Ok(held)) => !same(&named, &held),
                    _ => true,
                };
                if !moved && file.write_all(line).is_ok() {
                    return true;
                }
                match open(path) {
                    Ok(reopened) => {
                        *file = reopened;
                        file.write_all(line).is_ok()
                    }
                    Err(_) => false,
                }
            }
        }
    }
}

/// What the proxy sends to `POST /audit` on a backend's admin socket: a guard of the edge
/// that refused a request.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EdgeEvent {
    guard: String,
    client: IpAddr,
    route: String,
    request_id: String,
    correlation_id: String,
}

/// The most an edge event's body may be.
const EDGE_EVENT_BYTES: usize = 4096;

/// `POST /audit` on the admin socket: the proxy's tripped guard written as `guard.tripped`,
/// deduplicated and budgeted like the backend's own refusals. `204`, or `400` for a body that
/// is not one.
pub async fn edge_event(app: &crate::App, body: hyper::body::Incoming) -> http::StatusCode {
    use http_body_util::BodyExt;
    let read = http_body_util::Limited::new(body, EDGE_EVENT_BYTES).collect();
    let Ok(Ok(bytes)) = tokio::time::timeout(Duration::from_secs(2), read).await else {
        return http::StatusCode::BAD_REQUEST;
    };
    let Ok(edge) = serde_json::from_slice::<EdgeEvent>(&bytes.to_bytes()) else {
        return http::StatusCode::BAD_REQUEST;
    };
    let guard = match edge.guard.as_str() {
        "rate_limit" => "rate_limit",
        "basic_auth_guard" => "basic_auth_guard",
        _ => return http::StatusCode::BAD_REQUEST,
    };
    let short = |s: &str| s.len() <= 256;
    if !(short(&edge.route) && short(&edge.request_id) && short(&edge.correlation_id)) {
        return http::StatusCode::BAD_REQUEST;
    }
    // The guard and route stand for the actor: one event per guard, client and route.
    let actor = format!("{guard} {}", edge.route);
    if app
        .audit
        .admit_refusal("guard.tripped", Some(edge.client), Some(&actor))
    {
        app.audit
            .record(Event {
                event: "guard.tripped",
                client: Some(edge.client),
                request_id: Some(&edge.request_id),
                correlation_id: Some(&edge.correlation_id),
                target: Some(&edge.route),
                outcome: "denied",
                detail: Some(guard),
                ..Event::default()
            })
            .await;
    }
    http::StatusCode::NO_CONTENT
}

/// A stream id as Redis makes them (`MILLISECONDS-SEQUENCE`), so a client's `before` goes to
/// Redis only as one. At most 19 digits each, which always fits Redis's 64 bits (and is the
/// document's pattern).
pub fn valid_stream_id(id: &str) -> bool {
    let number = |s: &str| (1..=19).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    id.split_once('-')
        .is_some_and(|(ms, seq)| number(ms) && number(seq))
}

fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stream_ids_are_taken() {
        assert!(valid_stream_id("1790000000000-0"));
        assert!(valid_stream_id("9999999999999999999-0"));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "+",
            "(1-0",
            "1 -0",
            "a-b",
            "+1-0",
            "18446744073709551615-0",
        ] {
            assert!(!valid_stream_id(bad), "{bad}");
        }
    }

    #[test]
    fn an_event_is_one_flat_json_object() {
        let event = Event {
            event: "login.failed",
            actor: Some("alice"),
            client: "192.0.2.1".parse().ok(),
            outcome: "failure",
            ..Event::default()
        };
        let line = Line {
            time: "t".into(),
            event: &event,
            source: "backend-1",
        };
        let json: serde_json::Value = serde_json::to_value(&line).unwrap();
        assert_eq!(json["event"], "login.failed");
        assert_eq!(json["client"], "192.0.2.1");
        assert_eq!(json["target"], serde_json::Value::Null);
        assert_eq!(json["source"], "backend-1");
    }
}
