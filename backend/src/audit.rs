//! The audit log: security events (sign-ins, changes to users and keys, refusals, reloads and
//! upgrades), each one JSON object with its time, event, actor, client, request and
//! correlation ids, target and outcome, never a secret.
//!
//! Each event goes to two places: a line appended to the audit file (every process of the
//! group appends to the same file; one `write` per line on a file opened for appending keeps
//! lines whole), and an entry of a Redis stream capped near `audit.max_events`, which every
//! backend and replica shares and `GET /api/audit` reads, newest first. A file renamed away
//! (by logrotate) is followed by a new one at the next event. Either may fail alone
//! (a full disk, Redis down): the event is still in the other, the failure is counted, and the
//! event is also logged at `warn`, so it is never lost silently.
//!
//! Refusals an attacker can cause by the thousand (a throttled login, a bad key, a denied
//! permission) are written once per event, client and target in [`REPEAT_WINDOW`], so a
//! flood neither fills the stream, pushing older events out, nor costs Redis a write each.

use std::{
    collections::HashMap,
    fs::File,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{error::ApiError, keys::AUDIT, metrics::Metrics, store::Store};

/// The default of `audit.max_events`.
pub const DEFAULT_MAX_EVENTS: u64 = 100_000;
/// The most events `GET /api/audit` returns at once.
pub const MAX_PAGE: usize = 500;
/// A repeated refusal (same event, client and target) within this is not written again.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(10);
/// Refusals remembered for [`REPEAT_WINDOW`]: past this, the table is cleared, so a flood
/// from ever new addresses costs memory no larger than this.
const REPEATS_KEPT: usize = 4096;

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

type Refusal = (String, Option<IpAddr>, String);

pub struct Audit {
    store: Arc<Store>,
    file: Option<(PathBuf, Mutex<File>)>,
    /// Lines go to standard output instead of a file.
    stdout: bool,
    max_events: u64,
    source: String,
    metrics: Option<Arc<Metrics>>,
    /// When each refusal (event, client, target) was last written.
    repeats: Mutex<HashMap<Refusal, Instant>>,
}

impl Audit {
    /// `file`: the audit file, opened for appending now (created if missing, `0600`), so a
    /// path that cannot be written stops the start rather than losing events later.
    pub fn new(
        store: Arc<Store>,
        file: Option<&Path>,
        max_events: u64,
        source: &str,
        metrics: Option<Arc<Metrics>>,
    ) -> std::io::Result<Self> {
        let stdout = file == Some(Path::new("-"));
        let file = match file {
            // Standard output: a container's log, beside the access log's JSON lines.
            Some(path) if path == Path::new("-") => None,
            Some(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Some((path.to_path_buf(), Mutex::new(open(path)?)))
            }
            None => None,
        };
        Ok(Self {
            stdout,
            store,
            file,
            max_events: max_events.max(1),
            source: source.to_string(),
            metrics,
            repeats: Mutex::new(HashMap::new()),
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
        if let Some(metrics) = &self.metrics {
            metrics.audit_event();
        }
        let file_ok = self.append(&json);
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
        if !(file_ok && stream_ok) {
            if let Some(metrics) = &self.metrics {
                metrics.audit_failure();
            }
            tracing::warn!(audit = %json, file = file_ok, stream = stream_ok,
                "an audit event could not be written everywhere");
        }
    }

    /// As [`Audit::record`], unless the same refusal (event, client, target) was written
    /// within [`REPEAT_WINDOW`].
    pub async fn record_refusal(&self, event: Event<'_>) {
        let key = (
            event.event.to_string(),
            event.client,
            event.target.unwrap_or_default().to_string(),
        );
        {
            let mut repeats = self
                .repeats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            if repeats
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < REPEAT_WINDOW)
            {
                return;
            }
            if repeats.len() >= REPEATS_KEPT {
                repeats.retain(|_, at| now.duration_since(*at) < REPEAT_WINDOW);
                if repeats.len() >= REPEATS_KEPT {
                    repeats.clear();
                }
            }
            repeats.insert(key, now);
        }
        self.record(event).await;
    }

    /// One line, in one `write`, to the file opened for appending. The file is opened again
    /// when the path names another file than the one held (logrotate renamed it away: events
    /// are few, so a `stat` each costs nothing and needs no signal to every process), or
    /// when the write fails.
    fn append(&self, json: &str) -> bool {
        use std::os::unix::fs::MetadataExt;
        let mut line = String::with_capacity(json.len() + 1);
        line.push_str(json);
        line.push('\n');
        if self.stdout {
            return std::io::stdout().lock().write_all(line.as_bytes()).is_ok();
        }
        let Some((path, file)) = &self.file else {
            return true;
        };
        let mut file = file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let same =
            |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
        let moved = match (std::fs::metadata(path), file.metadata()) {
            (Ok(named), Ok(held)) => !same(&named, &held),
            _ => true,
        };
        if !moved && file.write_all(line.as_bytes()).is_ok() {
            return true;
        }
        match open(path) {
            Ok(reopened) => {
                *file = reopened;
                file.write_all(line.as_bytes()).is_ok()
            }
            Err(_) => false,
        }
    }

    /// The newest events first, at most `limit`, older than stream id `before` if given;
    /// each event's JSON with its stream `id` added.
    pub async fn page(
        &self,
        limit: usize,
        before: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        let end = match before {
            // Nothing is older than the first id there can be (and Redis refuses the range).
            Some(id) if id.split('-').all(|n| n.parse() == Ok(0u64)) => return Ok(Vec::new()),
            Some(id) => format!("({id}"),
            None => "+".to_string(),
        };
        let mut conn = self.store.connection();
        let entries: Vec<(String, Vec<(String, String)>)> = self
            .store
            .bounded(async {
                redis::cmd("XREVRANGE")
                    .arg(AUDIT)
                    .arg(&end)
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit.clamp(1, MAX_PAGE))
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(id, fields)| {
                let json = fields.into_iter().find(|(k, _)| k == "e")?.1;
                let mut event: serde_json::Value = serde_json::from_str(&json).ok()?;
                event
                    .as_object_mut()?
                    .insert("id".into(), serde_json::Value::String(id));
                Some(event)
            })
            .collect())
    }
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
