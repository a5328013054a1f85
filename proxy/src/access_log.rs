//! Access logs: one line per request, in the route's file, as JSON or nginx "combined".
//!
//! A request hands its [`Record`] to a bounded channel and moves on; one writer thread
//! wakes every [`BATCH_INTERVAL`], formats and writes what has queued up through buffers, and
//! flushes. It never waits on the channel itself, so a request never has to wake it (a
//! wake-up per request cost more than the line). When the writer falls behind, lines are
//! dropped and counted rather than slowing requests down. [`AccessLog::reopen`] (on SIGUSR1)
//! makes the writer reopen every file, so logrotate can move them away.
//!
//! A line never carries the `Authorization` header, a token, a password or the query string
//! (which may hold any of them).

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel},
    },
    time::{Duration, Instant, SystemTime},
};

use prometheus::IntCounter;
use serde::Serialize;

use crate::error::BuildError;

/// Where a log goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Combined,
}

/// One request, as logged.
pub struct Record {
    /// Index of the target in the list [`AccessLog::start`] was given.
    pub target: usize,
    pub time: SystemTime,
    pub request_id: String,
    /// `None`: the request id.
    pub correlation_id: Option<String>,
    pub client: IpAddr,
    pub method: http::Method,
    pub path: String,
    pub http2: bool,
    pub route: Arc<str>,
    pub status: u16,
    pub bytes: usize,
    pub duration: Duration,
    pub upstream: Option<Arc<str>>,
    pub upstream_duration: Option<Duration>,
    pub user: Option<String>,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
    /// On a route with a response cache: `hit`, `miss`, `stale` or `bypass`.
    pub cache: Option<&'static str>,
}

/// Lines waiting for the writer; past this, new lines are dropped. With the interval below,
/// room for about 300,000 requests a second.
const QUEUE: usize = 16_384;

/// How often the writer takes the queued lines: how late a line may reach its file.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(50);

pub struct AccessLog {
    targets: Vec<LogTarget>,
    format: Format,
    sender: SyncSender<Record>,
    /// The channel's other end, until [`AccessLog::start`] hands it to the writer.
    receiver: Mutex<Option<Receiver<Record>>>,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
    /// Turns of the writer's loop, each one a full drain and flush.
    turns: Arc<AtomicU64>,
}

impl AccessLog {
    /// A log of `targets`, not writing yet: [`AccessLog::start`] opens the files, once
    /// everything else a reload builds has been built.
    pub fn new(targets: Vec<LogTarget>, format: Format, dropped: IntCounter) -> Arc<Self> {
        let (sender, receiver) = sync_channel(QUEUE);
        Arc::new(Self {
            targets,
            format,
            sender,
            receiver: Mutex::new(Some(receiver)),
            reopen: Arc::new(AtomicBool::new(false)),
            dropped,
            turns: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Opens every target (an error names the file) and starts the writer thread; a log
    /// already started is left as it is.
    pub fn start(&self) -> Result<(), BuildError> {
        let mut receiver = self.receiver.lock().unwrap_or_else(|e| e.into_inner());
        if receiver.is_none() {
            return Ok(());
        }
        let sinks = self
            .targets
            .iter()
            .cloned()
            .map(Sink::open)
            .collect::<Result<Vec<_>, _>>()?;
        let writer = Writer {
            sinks,
            format: self.format,
            reopen: self.reopen.clone(),
            turns: self.turns.clone(),
            failing: false,
            lost: self.dropped.clone(),
            stamps: Stamps::default(),
        };
        let Some(lines) = receiver.take() else {
            return Ok(());
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(lines))
            .map_err(BuildError::AccessLogWriter)?;
        Ok(())
    }

    /// Waits (at most a second) until every line logged so far is written: the process is
    /// about to exit, and the writer thread would die with the last lines still queued.
    pub fn flush_before_exit(&self) {
        let start = self.turns.load(Ordering::Acquire);
        let deadline = Instant::now() + Duration::from_secs(1);
        // Two turns: the one in progress may have started before the last lines came in.
        while self.turns.load(Ordering::Acquire) < start + 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Where `target` is in the list this log was started with: what a [`Record`] names.
    pub fn target_index(&self, target: &LogTarget) -> Option<usize> {
        self.targets.iter().position(|t| t == target)
    }

    /// Whether this log writes exactly these files in this format (a reload keeps it then).
    pub fn writes(&self, targets: &[LogTarget], format: Format) -> bool {
        self.targets == targets && self.format == format
    }

    pub fn log(&self, record: Record) {
        match self.sender.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Reopens every file at the writer's next turn.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }
}

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File { path: PathBuf, out: BufWriter<File> },
}

impl Sink {
    fn open(target: LogTarget) -> Result<Sink, BuildError> {
        Ok(match target {
            LogTarget::Stdout => Sink::Stdout(BufWriter::new(io::stdout())),
            LogTarget::File(path) => Sink::File {
                out: BufWriter::new(open(&path)?),
                path,
            },
        })
    }

    fn out(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(out) => out,
            Sink::File { out, .. } => out,
        }
    }
}

fn open(path: &PathBuf) -> Result<File, BuildError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BuildError::AccessLogDirectory {
            dir: dir.to_owned(),
            source,
        })?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| BuildError::AccessLog {
            path: path.clone(),
            source,
        })
}

struct Writer {
    sinks: Vec<Sink>,
    format: Format,
    reopen: Arc<AtomicBool>,
    turns: Arc<AtomicU64>,
    /// Whether writes are failing (a full disk): logged once when it starts and once when it
    /// ends, not once per line.
    failing: bool,
    /// Lines that could not be written count as dropped.
    lost: IntCounter,
    stamps: Stamps,
}

impl Writer {
    fn run(mut self, receiver: Receiver<Record>) {
        let mut line = Vec::with_capacity(512);
        loop {
            let mut wrote = false;
            loop {
                match receiver.try_recv() {
                    Ok(record) => {
                        self.write(&record, &mut line);
                        wrote = true;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.flush();
                        return;
                    }
                }
            }
            if wrote {
                self.flush();
            }
            if self.reopen.swap(false, Ordering::Relaxed) {
                self.reopen_files();
            }
            self.turns.fetch_add(1, Ordering::Release);
            std::thread::sleep(BATCH_INTERVAL);
        }
    }

    fn write(&mut self, record: &Record, line: &mut Vec<u8>) {
        let Some(sink) = self.sinks.get_mut(record.target) else {
            return;
        };
        line.clear();
        match self.format {
            Format::Json => json_line(record, line, &mut self.stamps),
            Format::Combined => combined_line(record, line, &mut self.stamps),
        }
        line.push(b'\n');
        let written = sink.out().write_all(line);
        self.outcome(written);
    }

    fn flush(&mut self) {
        let mut outcome = Ok(());
        for sink in &mut self.sinks {
            if let Err(error) = sink.out().flush() {
                outcome = Err(error);
            }
        }
        if outcome.is_err() || self.failing {
            self.outcome(outcome);
        }
    }

    fn outcome(&mut self, result: io::Result<()>) {
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("access log writes work again");
            }
            Ok(()) => {}
            Err(error) => {
                self.lost.inc();
                if !self.failing {
                    self.failing = true;
                    tracing::error!(%error, "cannot write the access log; lines are dropped until it works again");
                }
            }
        }
    }

    fn reopen_files(&mut self) {
        self.flush();
        for sink in &mut self.sinks {
            if let Sink::File { path, out } = sink {
                match open(path) {
                    Ok(file) => *out = BufWriter::new(file),
                    // The old file keeps receiving lines; nothing is lost.
                    Err(error) => tracing::error!(%error, "cannot reopen the access log"),
                }
            }
        }
        tracing::info!("access logs reopened");
    }
}

/// Line timestamps, UTC: the part down to the second is formatted once per second.
#[derive(Default)]
struct Stamps {
    second: Option<u64>,
    /// `2026-11-22T10:08:40`
    iso: String,
    /// `22/Nov/2026:10:08:40 +0000`
    common: String,
    /// The last JSON timestamp, with microseconds.
    line: String,
}

impl Stamps {
    /// Brings the cached parts to `time`'s second; returns its microseconds.
    fn at(&mut self, time: SystemTime) -> u32 {
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let since = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        if self.second != Some(since.as_secs()) {
            self.second = Some(since.as_secs());
            let t = time::OffsetDateTime::from(time);
            let month = MONTHS[usize::from(u8::from(t.month())) - 1];
            let (y, d, h, m, s) = (t.year(), t.day(), t.hour(), t.minute(), t.second());
            let n = u8::from(t.month());
            self.iso = format!("{y:04}-{n:02}-{d:02}T{h:02}:{m:02}:{s:02}");
            self.common = format!("{d:02}/{month}/{y}:{h:02}:{m:02}:{s:02} +0000");
        }
        since.subsec_micros()
    }

    fn iso(&mut self, time: SystemTime) -> &str {
        let micros = self.at(time);
        self.line.clear();
        let _ =
            std::fmt::Write::write_fmt(&mut self.line, format_args!("{}.{micros:06}Z", self.iso));
        &self.line
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    time: &'a str,
    request_id: &'a str,
    correlation_id: &'a str,
    client: IpAddr,
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    route: &'a str,
    status: u16,
    bytes: usize,
    duration_ms: f64,
    upstream: Option<&'a str>,
    upstream_ms: Option<f64>,
    user: Option<&'a str>,
    user_agent: Option<&'a str>,
    referer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'static str>,
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn protocol(record: &Record) -> &'static str {
    if record.http2 { "HTTP/2.0" } else { "HTTP/1.1" }
}

fn json_line(record: &Record, out: &mut Vec<u8>, stamps: &mut Stamps) {
    let time = stamps.iso(record.time);
    let line = JsonLine {
        time,
        request_id: &record.request_id,
        correlation_id: record
            .correlation_id
            .as_deref()
            .unwrap_or(&record.request_id),
        client: record.client,
        method: record.method.as_str(),
        path: &record.path,
        protocol: protocol(record),
        route: &record.route,
        status: record.status,
        bytes: record.bytes,
        duration_ms: millis(record.duration),
        upstream: record.upstream.as_deref(),
        upstream_ms: record.upstream_duration.map(millis),
        user: record.user.as_deref(),
        user_agent: record.user_agent.as_deref(),
        referer: record.referer.as_deref(),
        cache: record.cache,
    };
    // Serializing plain strings and numbers into a Vec does not fail.
    let _ = serde_json::to_writer(&mut *out, &line);
}

/// nginx's "combined", then the request id, the request time, the backend and its time, and
/// the correlation id: `$remote_addr - $remote_user [$time_local] "$request" $status
/// $body_bytes_sent "$http_referer" "$http_user_agent" $request_id $request_time $upstream
/// $upstream_time $correlation_id`.
fn combined_line(record: &Record, out: &mut Vec<u8>, stamps: &mut Stamps) {
    stamps.at(record.time);
    let _ = write!(out, "{} - ", record.client);
    quoted_or_dash(out, record.user.as_deref(), false);
    let _ = write!(out, " [{}] \"{} ", stamps.common, record.method);
    escaped(out, &record.path);
    let _ = write!(
        out,
        " {}\" {} {} ",
        protocol(record),
        record.status,
        record.bytes
    );
    quoted_or_dash(out, record.referer.as_deref(), true);
    out.push(b' ');
    quoted_or_dash(out, record.user_agent.as_deref(), true);
    let _ = write!(
        out,
        " {} {:.3} {} ",
        record.request_id,
        record.duration.as_secs_f64(),
        record.upstream.as_deref().unwrap_or("-"),
    );
    match record.upstream_duration {
        Some(d) => {
            let _ = write!(out, "{:.3}", d.as_secs_f64());
        }
        None => out.push(b'-'),
    }
    out.push(b' ');
    // Ids are checked when accepted: no quoting needed.
    out.extend_from_slice(
        record
            .correlation_id
            .as_deref()
            .unwrap_or(&record.request_id)
            .as_bytes(),
    );
}

fn quoted_or_dash(out: &mut Vec<u8>, value: Option<&str>, quote: bool) {
    match value {
        Some(value) if !value.is_empty() => {
            if quote {
                out.push(b'"');
            }
            escaped(out, value);
            if quote {
                out.push(b'"');
            }
        }
        _ if quote => out.extend_from_slice(b"\"-\""),
        _ => out.push(b'-'),
    }
}

/// Like nginx: quotes, backslashes, controls and non-ASCII bytes become `\xHH`, so a client
/// cannot forge a line or a field.
fn escaped(out: &mut Vec<u8>, value: &str) {
    for &b in value.as_bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            target: 0,
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            request_id: "rid-1".into(),
            correlation_id: Some("tx-7".into()),
            client: "203.0.113.9".parse().unwrap(),
            method: http::Method::GET,
            path: "/open/\"x\"".into(),
            http2: false,
            route: Arc::from("/open/"),
            status: 200,
            bytes: 512,
            duration: Duration::from_micros(1500),
            upstream: Some(Arc::from("b2")),
            upstream_duration: Some(Duration::from_micros(900)),
            user: Some("admin".into()),
            user_agent: Some("curl/8.0\n".into()),
            referer: None,
            cache: Some("hit"),
        }
    }

    #[test]
    fn combined_is_nginx_shaped_and_escaped() {
        let mut out = Vec::new();
        combined_line(&record(), &mut out, &mut Stamps::default());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "203.0.113.9 - admin [14/Nov/2023:22:13:20 +0000] \"GET /open/\\x22x\\x22 HTTP/1.1\" 200 512 \"-\" \"curl/8.0\\x0A\" rid-1 0.002 b2 0.001 tx-7"
        );
    }

    #[test]
    fn json_has_every_field() {
        let mut out = Vec::new();
        json_line(&record(), &mut out, &mut Stamps::default());
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["time"], "2023-11-14T22:13:20.000000Z");
        assert_eq!(value["status"], 200);
        assert_eq!(value["duration_ms"], 1.5);
        assert_eq!(value["upstream"], "b2");
        assert_eq!(value["correlation_id"], "tx-7");
        assert_eq!(value["cache"], "hit");
        assert_eq!(value["user"], "admin");
        assert_eq!(value["path"], "/open/\"x\"");
    }
}
