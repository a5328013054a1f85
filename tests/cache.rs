//! The per-route cache of upstream responses (`[routes.cache]`, `[cache]`), through
//! `gatehouse proxy` to a named pool of one server the test starts and programs per path: what
//! is kept and for how long, the key (host, path, query, `Vary`), one upstream request for many
//! concurrent misses, stale answers while revalidating or while the server fails, requests
//! with credentials, HEAD and other methods, purging through the admin listener, the metrics,
//! the size limits, and the cache settings `gatehouse check` refuses.

use std::{
    collections::HashMap,
    io::{BufReader, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::{
    socket_dir,
    util::{self, BIN, metric_sum, metric_value, read_request, wait_until},
};

/// What the test server answers for one path (its query aside).
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    /// The body padded with dots to this many bytes.
    size: Option<usize>,
    chunked: bool,
    /// Before answering: a slow server, for the tests that need a request in flight.
    delay: Duration,
}

impl Default for Answer {
    fn default() -> Self {
        Answer {
            status: 200,
            headers: Vec::new(),
            size: None,
            chunked: false,
            delay: Duration::ZERO,
        }
    }
}

impl Answer {
    fn cache_control(value: &str) -> Answer {
        Answer::default().header("Cache-Control", value)
    }

    fn header(mut self, name: &str, value: &str) -> Answer {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn status(mut self, status: u16) -> Answer {
        self.status = status;
        self
    }

    fn size(mut self, size: usize) -> Answer {
        self.size = Some(size);
        self
    }

    fn chunked(mut self) -> Answer {
        self.chunked = true;
        self
    }

    fn delay(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

/// The upstream server. Its bodies are `TARGET LANGUAGE #N`: the target as the proxy sent it,
/// the request's `Accept-Language` (`-` without one) and the number of the upstream request
/// that made it, so a body served twice tells a hit from a second trip upstream.
struct Origin {
    port: u16,
    /// By path; a path with no answer gets a `200` that says nothing about caching.
    answers: Mutex<HashMap<String, Answer>>,
    /// Requests that reached the server, by target (path and query).
    seen: Mutex<HashMap<String, usize>>,
    served: AtomicUsize,
    /// Answers every request `503`.
    failing: AtomicBool,
    /// No longer listening; requests on connections already open are closed unanswered.
    stopped: AtomicBool,
}

impl Origin {
    fn start() -> Arc<Origin> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let origin = Arc::new(Origin {
            port: listener.local_addr().expect("address").port(),
            answers: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            served: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        });
        let shared = origin.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.stopped.load(Ordering::SeqCst) {
                    // The listener goes with this thread: new connections are refused.
                    break;
                }
                let Ok(stream) = stream else { continue };
                let origin = shared.clone();
                thread::spawn(move || origin.serve(stream));
            }
        });
        origin
    }

    fn set(&self, path: &str, answer: Answer) {
        self.answers
            .lock()
            .expect("answers")
            .insert(path.to_owned(), answer);
    }

    /// How many requests for `target` reached the server.
    fn seen(&self, target: &str) -> usize {
        self.seen
            .lock()
            .expect("seen")
            .get(target)
            .copied()
            .unwrap_or(0)
    }

    /// Stops listening, so the pool's only server refuses connections.
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then drops the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        assert!(
            wait_until(Duration::from_secs(5), || TcpStream::connect((
                "127.0.0.1",
                self.port
            ))
            .is_err()),
            "the test server still accepts connections"
        );
    }

    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream);
        while let Some(request) = read_request(&mut reader) {
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            let response = self.respond(&request);
            if reader.get_mut().write_all(&response).is_err() {
                return;
            }
        }
    }

    fn respond(&self, request: &util::Request) -> Vec<u8> {
        let mut parts = request.line.split(' ');
        let method = parts.next().unwrap_or_default();
        let target = parts.next().unwrap_or_default();
        *self
            .seen
            .lock()
            .expect("seen")
            .entry(target.to_owned())
            .or_default() += 1;
        let n = self.served.fetch_add(1, Ordering::SeqCst) + 1;
        if self.failing.load(Ordering::SeqCst) {
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown".to_vec();
        }
        let path = target.split('?').next().unwrap_or_default();
        let answer = self
            .answers
            .lock()
            .expect("answers")
            .get(path)
            .cloned()
            .unwrap_or_default();
        thread::sleep(answer.delay);
        let language = request.values("accept-language").next().unwrap_or("-");
        let mut body = format!("{target} {language} #{n}").into_bytes();
        if let Some(size) = answer.size {
            body.resize(size, b'.');
        }
        let mut head = format!("HTTP/1.1 {} {}\r\n", answer.status, reason(answer.status));
        for (name, value) in &answer.headers {
            head += &format!("{name}: {value}\r\n");
        }
        if answer.status == 204 {
            return format!("{head}\r\n").into_bytes();
        }
        if answer.chunked && method != "HEAD" {
            head += "Transfer-Encoding: chunked\r\n\r\n";
            let mut response = head.into_bytes();
            for chunk in body.chunks(1000) {
                response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                response.extend_from_slice(chunk);
                response.extend_from_slice(b"\r\n");
            }
            response.extend_from_slice(b"0\r\n\r\n");
            return response;
        }
        head += &format!("Content-Length: {}\r\n\r\n", body.len());
        let mut response = head.into_bytes();
        if method != "HEAD" {
            response.extend_from_slice(&body);
        }
        response
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        404 => "Not Found",
        _ => "Other",
    }
}

/// `t` as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm), March-based years.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {month} {year} {:02}:{:02}:{:02} GMT",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// What a client got.
struct Reply {
    status: u16,
    /// `X-Cache`, empty when absent.
    cache: String,
    age: Option<u64>,
    /// The `Content-Length` header as sent (a HEAD answer has no body to measure).
    length: Option<usize>,
    body: String,
    took: Duration,
}

fn send(request: reqwest::blocking::RequestBuilder) -> Reply {
    let started = Instant::now();
    let response = request.send().expect("a response from the proxy");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (status, cache) = (response.status().as_u16(), header("x-cache"));
    let age = header("age").map(|v| v.parse().expect("Age is a number of seconds"));
    let length = header("content-length").and_then(|v| v.parse().ok());
    let body = response.text().expect("body");
    Reply {
        status,
        cache: cache.unwrap_or_default(),
        age,
        length,
        body,
        took: started.elapsed(),
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// `gatehouse proxy` with the pool `app` of the one `origin`, `[cache]` and other top-level
/// settings from `keys` (dotted), and a cache route to `app` for each `(prefix, [routes.cache]
/// keys)`.
struct Proxy {
    // Declared first so the proxy stops before its directory goes.
    _process: util::Process,
    _dir: tempfile::TempDir,
    port: u16,
    admin_port: u16,
    client: reqwest::blocking::Client,
}

impl Proxy {
    fn start(origin: &Origin, keys: &str, routes: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut tables = format!(
            "[upstreams.app]\nservers = [\"127.0.0.1:{}\"]\n",
            origin.port
        );
        for (prefix, cache) in routes {
            tables += &format!(
                "[[routes]]\nprefix = \"{prefix}\"\nupstream = \"app\"\n[routes.cache]\n{cache}\n"
            );
        }
        let (_, port, admin_port) = socket_dir::socket_dir_config_with_routes(
            dir.path(),
            "redis://127.0.0.1:1".into(),
            keys,
            tables,
        );
        // Nothing says how long to keep this path's answer: it is never stored.
        let first = routes.first().expect("a cache route").0;
        let process = socket_dir::start_proxy(dir.path(), port, &format!("{first}ready"));
        Proxy {
            _process: process,
            _dir: dir,
            port,
            admin_port,
            client: client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn get(&self, path: &str) -> Reply {
        send(self.client.get(self.url(path)))
    }

    fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.client.get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        send(request)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// `DELETE /cache?QUERY` on the admin listener: the status and the JSON body (`Null`
    /// when it is not JSON).
    fn purge(&self, query: &str) -> (u16, Value) {
        let response = self
            .client
            .delete(format!(
                "http://127.0.0.1:{}/cache?{query}",
                self.admin_port
            ))
            .send()
            .expect("admin listener");
        let status = response.status().as_u16();
        let text = response.text().expect("purge body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn metrics(&self) -> String {
        self.client
            .get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .send()
            .and_then(|r| r.text())
            .expect("metrics")
    }
}

/// `s` form-encoded as a query value (`/` left as it is).
fn form(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Two GETs of `path` (with `headers`): the first goes upstream, the second is served from
/// the cache with the first's body and status. Returns the hit.
#[track_caller]
fn assert_kept(proxy: &Proxy, origin: &Origin, path: &str, headers: &[(&str, &str)]) -> Reply {
    let before = origin.seen(path);
    let miss = proxy.get_with(path, headers);
    assert_eq!(miss.cache, "MISS", "{path}: first request: {}", miss.body);
    let hit = proxy.get_with(path, headers);
    assert_eq!(hit.cache, "HIT", "{path}: second request: {}", hit.body);
    assert_eq!(hit.body, miss.body, "{path}: the hit has the stored body");
    assert_eq!(
        hit.status, miss.status,
        "{path}: the hit has the stored status"
    );
    assert!(hit.age.is_some(), "{path}: a hit carries Age");
    assert_eq!(origin.seen(path), before + 1, "{path}: upstream requests");
    hit
}

/// Two GETs of `path`, both sent upstream.
#[track_caller]
fn assert_not_kept(proxy: &Proxy, origin: &Origin, path: &str) {
    let before = origin.seen(path);
    let first = proxy.get(path);
    let second = proxy.get(path);
    for (which, reply) in [("first", &first), ("second", &second)] {
        assert_eq!(
            reply.cache, "MISS",
            "{path}: {which} request: {}",
            reply.body
        );
    }
    assert_ne!(
        first.body, second.body,
        "{path}: the second came from upstream"
    );
    assert_eq!(origin.seen(path), before + 2, "{path}: upstream requests");
}

/// Asks for `path` until the answer is no longer a hit, within `timeout`; that answer.
#[track_caller]
fn first_after_expiry(proxy: &Proxy, path: &str, timeout: Duration) -> Reply {
    let deadline = Instant::now() + timeout;
    loop {
        let reply = proxy.get(path);
        if reply.cache != "HIT" {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still a hit after {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fresh_response_is_a_hit_until_its_max_age_passes() {
    let origin = Origin::start();
    origin.set("/c/fresh", Answer::cache_control("max-age=2"));
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);

    let stored_at = Instant::now();
    let stored = assert_kept(&proxy, &origin, "/c/fresh", &[]);
    assert_eq!(stored.status, 200);
    assert!(stored.body.starts_with("/c/fresh - #"), "{}", stored.body);
    assert!(
        stored.age.is_some_and(|age| age <= 1),
        "Age {:?}",
        stored.age
    );
    // What clients ask with Cache-Control or Pragma does not force a trip upstream.
    let asked = proxy.get_with(
        "/c/fresh",
        &[
            ("cache-control", "no-cache, max-age=0"),
            ("pragma", "no-cache"),
        ],
    );
    assert_eq!((asked.cache.as_str(), &asked.body), ("HIT", &stored.body));
    assert_eq!(origin.seen("/c/fresh"), 1);

    let expired = first_after_expiry(&proxy, "/c/fresh", Duration::from_secs(5));
    // Clocks that count whole seconds may take up to one off max-age.
    assert!(
        stored_at.elapsed() >= Duration::from_secs(1),
        "expired after {:?}",
        stored_at.elapsed()
    );
    assert_eq!((expired.status, expired.cache.as_str()), (200, "MISS"));
    assert_ne!(expired.body, stored.body, "the expired entry was served");
    assert_eq!(origin.seen("/c/fresh"), 2);
    // The new answer is kept in its place.
    let hit = proxy.get("/c/fresh");
    assert_eq!((hit.cache.as_str(), &hit.body), ("HIT", &expired.body));
}

#[test]
fn freshness_comes_from_s_maxage_max_age_or_expires_and_covers_cacheable_statuses() {
    let origin = Origin::start();
    let now = SystemTime::now();
    let answers = [
        ("/c/shared", Answer::cache_control("max-age=0, s-maxage=60")),
        (
            "/c/expires",
            Answer::default()
                .header("Date", &http_date(now))
                .header("Expires", &http_date(now + Duration::from_secs(30))),
        ),
        (
            "/c/missing",
            Answer::cache_control("max-age=60").status(404),
        ),
        ("/c/empty", Answer::cache_control("max-age=60").status(204)),
    ];
    for (path, answer) in answers {
        origin.set(path, answer);
    }
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    for path in ["/c/shared", "/c/expires", "/c/missing", "/c/empty"] {
        assert_kept(&proxy, &origin, path, &[]);
    }
    assert_eq!(proxy.get("/c/missing").status, 404);
    let empty = proxy.get("/c/empty");
    assert_eq!((empty.status, empty.body.as_str()), (204, ""));
}

#[test]
fn responses_that_may_not_be_kept_go_upstream_every_time() {
    let origin = Origin::start();
    let now = http_date(SystemTime::now());
    let answers = [
        ("/c/no-store", Answer::cache_control("no-store, max-age=60")),
        ("/c/private", Answer::cache_control("private, max-age=60")),
        ("/c/no-cache", Answer::cache_control("no-cache, max-age=60")),
        (
            "/c/cookie",
            Answer::cache_control("max-age=60").header("Set-Cookie", "session=1; Path=/"),
        ),
        (
            "/c/vary-star",
            Answer::cache_control("max-age=60").header("Vary", "*"),
        ),
        // No freshness, and the route's default_ttl is 0.
        ("/c/silent", Answer::default()),
        ("/c/zero", Answer::cache_control("max-age=0")),
        // s-maxage wins over max-age, also when it says 0.
        (
            "/c/shared-zero",
            Answer::cache_control("s-maxage=0, max-age=60"),
        ),
        (
            "/c/expired",
            Answer::default()
                .header("Date", &now)
                .header("Expires", &now),
        ),
        // Not a status that may be kept.
        (
            "/c/created",
            Answer::cache_control("max-age=60").status(201),
        ),
    ];
    let paths: Vec<&str> = answers.iter().map(|(path, _)| *path).collect();
    for (path, answer) in answers {
        origin.set(path, answer);
    }
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    for path in paths {
        assert_not_kept(&proxy, &origin, path);
    }
}

#[test]
fn a_route_gives_a_default_freshness_and_caps_every_other() {
    let origin = Origin::start();
    origin.set("/c/long", Answer::cache_control("max-age=3600"));
    origin.set("/m/long", Answer::cache_control("max-age=3600"));
    origin.set("/d/no-store", Answer::cache_control("no-store"));
    let proxy = Proxy::start(
        &origin,
        "",
        &[
            ("/c/", ""),
            ("/d/", "default_ttl = \"2s\""),
            ("/m/", "max_ttl = \"1s\""),
        ],
    );
    // A response that says nothing is kept for the route's default_ttl, only there.
    assert_kept(&proxy, &origin, "/d/silent", &[]);
    assert_not_kept(&proxy, &origin, "/c/silent");
    // The default is for responses that say nothing; no-store still wins.
    assert_not_kept(&proxy, &origin, "/d/no-store");

    // max_ttl caps max-age=3600: the entry goes within a few seconds.
    let stored_at = Instant::now();
    assert_kept(&proxy, &origin, "/m/long", &[]);
    let expired = first_after_expiry(&proxy, "/m/long", Duration::from_secs(4));
    assert_eq!(expired.cache, "MISS");
    assert!(stored_at.elapsed() >= Duration::from_millis(500));
    // The same answer on a route with the default max_ttl (1h) stays.
    assert_kept(&proxy, &origin, "/c/long", &[]);
    thread::sleep(Duration::from_millis(1200));
    let later = proxy.get("/c/long");
    assert_eq!(later.cache, "HIT");
    // Age counts from when the server answered.
    assert!(later.age.is_some_and(|age| age >= 1), "Age {:?}", later.age);
}

#[test]
fn each_variant_named_by_vary_is_kept_apart() {
    let origin = Origin::start();
    origin.set(
        "/c/vary",
        Answer::cache_control("max-age=60").header("Vary", "Accept-Language"),
    );
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    let english = assert_kept(&proxy, &origin, "/c/vary", &en);
    let french = assert_kept(&proxy, &origin, "/c/vary", &fr);
    assert!(english.body.starts_with("/c/vary en #"), "{}", english.body);
    assert!(french.body.starts_with("/c/vary fr #"), "{}", french.body);
    // Each variant still answers with its own body, whichever was asked last.
    assert_eq!(proxy.get_with("/c/vary", &en).body, english.body);
    assert_eq!(proxy.get_with("/c/vary", &fr).body, french.body);
    // No Accept-Language is a variant of its own.
    assert_kept(&proxy, &origin, "/c/vary", &[]);
    assert_eq!(origin.seen("/c/vary"), 3);
}

#[test]
fn the_key_is_the_host_in_lower_case_the_path_and_the_query_as_sent() {
    let origin = Origin::start();
    origin.set("/c/key", Answer::cache_control("max-age=60"));
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);

    // A query in another order is another key.
    assert_kept(&proxy, &origin, "/c/key?a=1&b=2", &[]);
    assert_kept(&proxy, &origin, "/c/key?b=2&a=1", &[]);
    assert_kept(&proxy, &origin, "/c/key", &[]);

    let upper = [("host", "A.Example")];
    let lower = [("host", "a.example")];
    let other = [("host", "b.example")];
    let stored = proxy.get_with("/c/key?host", &upper);
    assert_eq!(stored.cache, "MISS");
    let same = proxy.get_with("/c/key?host", &lower);
    assert_eq!((same.cache.as_str(), &same.body), ("HIT", &stored.body));
    assert_eq!(proxy.get_with("/c/key?host", &other).cache, "MISS");
    assert_eq!(origin.seen("/c/key?host"), 2);
}

#[test]
fn concurrent_misses_of_one_key_make_one_upstream_request() {
    const CLIENTS: usize = 50;
    let origin = Origin::start();
    origin.set(
        "/c/slow",
        Answer::cache_control("max-age=60").delay(Duration::from_millis(300)),
    );
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let url = proxy.url("/c/slow");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (barrier, url) = (barrier.clone(), url.clone());
            thread::spawn(move || {
                // Each its own connection, all sent at once.
                let client = client();
                barrier.wait();
                send(client.get(url))
            })
        })
        .collect();
    let replies: Vec<Reply> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();

    assert_eq!(origin.seen("/c/slow"), 1, "upstream requests");
    let first = &replies[0].body;
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(&reply.body, first);
    }
    let count = |result: &str| replies.iter().filter(|r| r.cache == result).count();
    assert_eq!(
        (count("MISS"), count("HIT")),
        (1, CLIENTS - 1),
        "{:?}",
        replies.iter().map(|r| &r.cache).collect::<Vec<_>>()
    );
}

#[test]
fn a_miss_waits_for_another_no_longer_than_lock_timeout() {
    let origin = Origin::start();
    let slow = Answer::cache_control("max-age=60").delay(Duration::from_millis(1500));
    origin.set("/c/hung", slow);
    origin.set("/c/quick", Answer::cache_control("max-age=60"));
    let proxy = Proxy::start(&origin, "cache.lock_timeout = \"200ms\"", &[("/c/", "")]);
    let url = proxy.url("/c/hung");
    let first = thread::spawn(move || send(client().get(url)));
    assert!(wait_until(Duration::from_secs(5), || origin
        .seen("/c/hung")
        == 1));

    // Others are served meanwhile, and a second miss of the hung key goes on its own once
    // its wait is over, rather than for as long as the first takes.
    let started = Instant::now();
    assert_eq!(proxy.get("/c/quick").status, 200);
    assert!(started.elapsed() < Duration::from_millis(1000));
    let second = proxy.get("/c/hung");
    assert_eq!(
        origin.seen("/c/hung"),
        2,
        "the second miss went upstream itself"
    );
    let first = first.join().expect("first client");
    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(
        (first.cache.as_str(), second.cache.as_str()),
        ("MISS", "MISS")
    );
    assert_ne!(first.body, second.body);
}

#[test]
fn a_failing_server_is_covered_by_stale_if_error() {
    let origin = Origin::start();
    origin.set(
        "/c/covered",
        Answer::cache_control("max-age=1, stale-if-error=60"),
    );
    origin.set("/c/bare", Answer::cache_control("max-age=1"));
    // The route's default covers a response that names no stale-if-error.
    origin.set("/s/bare", Answer::cache_control("max-age=1"));
    let proxy = Proxy::start(
        &origin,
        "",
        &[("/c/", ""), ("/s/", "stale_if_error = \"60s\"")],
    );
    let stored: HashMap<&str, String> = ["/c/covered", "/s/bare", "/c/bare"]
        .into_iter()
        .map(|path| (path, assert_kept(&proxy, &origin, path, &[]).body))
        .collect();

    // The server answers 503.
    origin.failing.store(true, Ordering::SeqCst);
    for path in ["/c/covered", "/s/bare"] {
        let stale = first_after_expiry(&proxy, path, Duration::from_secs(5));
        assert_eq!(
            (stale.status, stale.cache.as_str(), &stale.body),
            (200, "STALE", &stored[path]),
            "{path} while the server answers 503"
        );
        assert!(stale.age.is_some(), "{path}: STALE carries Age");
    }
    let bare = first_after_expiry(&proxy, "/c/bare", Duration::from_secs(5));
    assert_eq!(bare.status, 503, "{}", bare.body);
    assert_ne!(bare.body, stored["/c/bare"]);

    // The server is gone: connections are refused.
    origin.stop();
    for path in ["/c/covered", "/s/bare"] {
        let stale = proxy.get(path);
        assert_eq!(
            (stale.status, stale.cache.as_str(), &stale.body),
            (200, "STALE", &stored[path]),
            "{path} while the server is gone"
        );
    }
    let bare = proxy.get("/c/bare");
    assert!(
        [502, 503, 504].contains(&bare.status),
        "{} {}",
        bare.status,
        bare.body
    );
    let error: Value = serde_json::from_str(&bare.body).expect("a JSON error");
    assert!(error["error"].is_string(), "{error}");
}

/// `path` (stored on its first request) served stale at once after expiry while one
/// background request, slower than the stale answer, refreshes it.
#[track_caller]
fn assert_revalidated_in_background(proxy: &Proxy, origin: &Origin, path: &str, answer: Answer) {
    origin.set(path, answer.clone());
    let old = proxy.get(path);
    assert_eq!(old.cache, "MISS");
    let refresh = Duration::from_millis(1000);
    origin.set(path, answer.delay(refresh));

    let stale = first_after_expiry(proxy, path, Duration::from_secs(5));
    assert_eq!(
        (stale.status, stale.cache.as_str(), &stale.body),
        (200, "STALE", &old.body),
        "{path} after expiry"
    );
    assert!(
        stale.took < refresh / 2,
        "{path}: STALE took {:?}, as long as the refresh",
        stale.took
    );
    assert!(stale.age.is_some(), "{path}: STALE carries Age");
    let mut fresh = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let reply = proxy.get(path);
            let refreshed = reply.cache == "HIT";
            fresh = Some(reply);
            refreshed
        }),
        "{path} was not refreshed"
    );
    let fresh = fresh.expect("a reply");
    assert_ne!(fresh.body, old.body, "{path}: the refresh's body");
    assert_eq!(origin.seen(path), 2, "{path}: one background request");
}

#[test]
fn an_expired_response_is_served_stale_while_one_request_revalidates_it() {
    let origin = Origin::start();
    let proxy = Proxy::start(
        &origin,
        "",
        &[("/c/", ""), ("/w/", "stale_while_revalidate = \"30s\"")],
    );
    assert_revalidated_in_background(
        &proxy,
        &origin,
        "/c/swr",
        Answer::cache_control("max-age=1, stale-while-revalidate=30"),
    );
    // The route's default, for a response that names none.
    assert_revalidated_in_background(
        &proxy,
        &origin,
        "/w/swr",
        Answer::cache_control("max-age=1"),
    );
}

#[test]
fn requests_with_credentials_share_only_public_responses() {
    let origin = Origin::start();
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    for (path, credential) in [
        ("/c/bearer", ("authorization", "Bearer x")),
        ("/c/session", ("cookie", "session=1")),
        ("/c/key", ("x-api-key", "gk_0123456789abcdef_00")),
    ] {
        origin.set(path, Answer::cache_control("max-age=60"));
        let bypass = proxy.get_with(path, &[credential]);
        assert_eq!((bypass.status, bypass.cache.as_str()), (200, "BYPASS"));
        // Not kept for anyone else.
        let stored = assert_kept(&proxy, &origin, path, &[]);
        // A stored response that is not public is not served to an authorised request.
        let again = proxy.get_with(path, &[credential]);
        assert_eq!(again.cache, "BYPASS", "{path}");
        assert_ne!(again.body, stored.body, "{path}: served from the cache");
        assert_eq!(origin.seen(path), 3, "{path}");
        // Nor did it replace the stored one.
        assert_eq!(proxy.get(path).body, stored.body);
    }

    origin.set("/c/public", Answer::cache_control("public, max-age=60"));
    let first = proxy.get_with("/c/public", &[("authorization", "Bearer x")]);
    // Nothing stored yet: it went upstream whatever it is called.
    assert!(
        ["BYPASS", "MISS"].contains(&first.cache.as_str()),
        "{}",
        first.cache
    );
    let anonymous = proxy.get("/c/public");
    assert_eq!(
        (anonymous.cache.as_str(), &anonymous.body),
        ("HIT", &first.body)
    );
    for credential in [("authorization", "Bearer y"), ("cookie", "session=2")] {
        let shared = proxy.get_with("/c/public", &[credential]);
        assert_eq!((shared.cache.as_str(), &shared.body), ("HIT", &first.body));
    }
    assert_eq!(origin.seen("/c/public"), 1);
}

#[test]
fn the_admin_listener_purges_one_url_or_a_prefix() {
    let origin = Origin::start();
    for path in ["/c/p/one", "/c/p/two", "/c/q/three", "/c/h/x"] {
        origin.set(path, Answer::cache_control("max-age=60"));
    }
    origin.set(
        "/c/p/vary",
        Answer::cache_control("max-age=60").header("Vary", "Accept-Language"),
    );
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    let (en, fr) = ([("accept-language", "en")], [("accept-language", "fr")]);
    let (a, b) = ([("host", "a.example")], [("host", "b.example")]);
    for path in ["/c/p/one", "/c/p/two?a=1", "/c/q/three"] {
        assert_kept(&proxy, &origin, path, &[]);
    }
    assert_kept(&proxy, &origin, "/c/p/vary", &en);
    assert_kept(&proxy, &origin, "/c/p/vary", &fr);
    assert_kept(&proxy, &origin, "/c/h/x", &a);
    assert_kept(&proxy, &origin, "/c/h/x", &b);

    let admin = format!("http://127.0.0.1:{}/cache?prefix=/c/", proxy.admin_port);
    let get = proxy.client.get(admin).send().expect("admin listener");
    assert_eq!(get.status(), 405, "a GET purges nothing");
    assert_eq!(proxy.purge("").0, 400, "neither path nor prefix");
    assert_eq!(proxy.get("/c/p/one").cache, "HIT");

    // One URL: its path and query.
    let (status, body) = proxy.purge(&format!("path={}", form("/c/p/two?a=1")));
    assert_eq!((status, &body), (200, &serde_json::json!({"purged": 1})));
    assert_eq!(proxy.get("/c/p/two?a=1").cache, "MISS");
    assert_eq!(proxy.get("/c/p/one").cache, "HIT");
    assert_eq!(proxy.get("/c/q/three").cache, "HIT");

    // One URL is all its variants.
    let (status, body) = proxy.purge("path=/c/p/vary");
    assert_eq!((status, &body), (200, &serde_json::json!({"purged": 2})));
    assert_eq!(proxy.get_with("/c/p/vary", &en).cache, "MISS");
    assert_eq!(proxy.get_with("/c/p/vary", &fr).cache, "MISS");

    // One URL of one host.
    let (status, body) = proxy.purge("path=/c/h/x&host=a.example");
    assert_eq!((status, &body), (200, &serde_json::json!({"purged": 1})));
    assert_eq!(proxy.get_with("/c/h/x", &a).cache, "MISS");
    assert_eq!(proxy.get_with("/c/h/x", &b).cache, "HIT");

    // A prefix: one, two?a=1 and both variants of vary, stored again above.
    let (status, body) = proxy.purge("prefix=/c/p/");
    assert_eq!((status, &body), (200, &serde_json::json!({"purged": 4})));
    assert_eq!(proxy.get("/c/p/one").cache, "MISS");
    assert_eq!(proxy.get("/c/p/two?a=1").cache, "MISS");
    assert_eq!(proxy.get("/c/q/three").cache, "HIT");
    let (status, body) = proxy.purge("prefix=/c/none/");
    assert_eq!((status, &body), (200, &serde_json::json!({"purged": 0})));
}

#[test]
fn head_is_served_from_a_stored_get_and_other_methods_bypass_the_cache() {
    let origin = Origin::start();
    origin.set("/c/doc", Answer::cache_control("max-age=60"));
    origin.set("/c/head-first", Answer::cache_control("max-age=60"));
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    let stored = proxy.get("/c/doc");
    assert_eq!(stored.cache, "MISS");

    let head = send(proxy.request(reqwest::Method::HEAD, "/c/doc"));
    assert_eq!((head.status, head.cache.as_str()), (200, "HIT"));
    assert_eq!(head.body, "");
    assert_eq!(head.length, Some(stored.body.len()));
    assert_eq!(origin.seen("/c/doc"), 1);

    // A HEAD miss goes upstream and leaves nothing to serve a GET.
    let head = send(proxy.request(reqwest::Method::HEAD, "/c/head-first"));
    assert_eq!((head.status, head.cache.as_str()), (200, "MISS"));
    assert_eq!(origin.seen("/c/head-first"), 1);
    assert_kept(&proxy, &origin, "/c/head-first", &[]);
    assert_eq!(origin.seen("/c/head-first"), 2);

    // A POST, and a GET with a body, are not looked up.
    let post = send(proxy.request(reqwest::Method::POST, "/c/doc").body("x"));
    assert_eq!((post.status, post.cache.as_str()), (200, "BYPASS"));
    assert_ne!(post.body, stored.body);
    let with_body = send(proxy.request(reqwest::Method::GET, "/c/doc").body("x"));
    assert_eq!(with_body.cache, "BYPASS");
    assert_ne!(with_body.body, stored.body);
    assert_eq!(origin.seen("/c/doc"), 3);
}

#[test]
fn the_metrics_and_the_access_log_count_results_hit_bytes_and_what_the_cache_holds() {
    let origin = Origin::start();
    origin.set("/c/counted", Answer::cache_control("max-age=60"));
    // The proxy's readiness request goes to /w/, leaving /c/'s counters at 0.
    let keys = "logging.access_log = \"access.log\"\nlogging.access_log_format = \"json\"";
    let proxy = Proxy::start(&origin, keys, &[("/w/", ""), ("/c/", "")]);
    let route = "route=\"/c/\"";
    let results = |text: &str| {
        ["miss", "hit", "stale", "bypass"].map(|result| {
            let result = format!("result=\"{result}\"");
            metric_sum(text, "gatehouse_cache_requests_total", &[route, &result])
        })
    };

    let miss = proxy.get("/c/counted");
    assert_eq!(miss.cache, "MISS");
    for _ in 0..2 {
        assert_eq!(proxy.get("/c/counted").cache, "HIT");
    }
    let post = send(proxy.request(reqwest::Method::POST, "/c/counted").body("x"));
    assert_eq!(post.cache, "BYPASS");

    let hit_bytes = 2.0 * miss.body.len() as f64;
    let mut text = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            text = proxy.metrics();
            results(&text) == [1.0, 2.0, 0.0, 1.0]
                && metric_sum(&text, "gatehouse_cache_hit_bytes_total", &[route]) == hit_bytes
        }),
        "1 miss, 2 hits of {hit_bytes} bytes, 1 bypass:\n{text}"
    );
    let entries = metric_value(&text, "gatehouse_cache_entries");
    assert!(entries.is_some_and(|n| n >= 1.0), "{text}");
    let bytes = metric_value(&text, "gatehouse_cache_bytes");
    assert!(bytes.is_some_and(|n| n >= miss.body.len() as f64), "{text}");

    // The access log says the same, per request (nginx's `$upstream_cache_status`).
    let log = proxy._dir.path().join("access.log");
    let mut lines = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            lines = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|l| l["route"] == "/c/")
                .map(|l| l["cache"].as_str().unwrap_or("none").to_owned())
                .collect();
            lines.len() == 4
        }),
        "four lines for /c/ in {}: {lines:?}",
        log.display()
    );
    assert_eq!(lines, ["miss", "hit", "hit", "bypass"]);
}

#[test]
fn responses_over_the_size_limits_are_relayed_whole_and_memory_stays_bounded() {
    const MAX_BYTES: usize = 1 << 20;
    const MAX_OBJECT: usize = 64 << 10;
    let origin = Origin::start();
    origin.set("/c/big", Answer::cache_control("max-age=60").size(100_000));
    // No Content-Length: the limit is found while the body streams.
    origin.set(
        "/c/big-chunked",
        Answer::cache_control("max-age=60").size(100_000).chunked(),
    );
    origin.set("/c/small", Answer::cache_control("max-age=60").size(1000));
    let proxy = Proxy::start(
        &origin,
        &format!("cache.max_bytes = {MAX_BYTES}\ncache.max_object_bytes = {MAX_OBJECT}\n"),
        &[("/c/", "")],
    );

    for path in ["/c/big", "/c/big-chunked"] {
        let first = proxy.get(path);
        let second = proxy.get(path);
        for reply in [&first, &second] {
            assert_eq!(
                (reply.status, reply.cache.as_str()),
                (200, "MISS"),
                "{path}"
            );
            assert_eq!(reply.body.len(), 100_000, "{path}: the body was cut");
            assert!(reply.body.starts_with(&format!("{path} - #")), "{path}");
            assert!(reply.body.ends_with("...."), "{path}");
        }
        assert_eq!(origin.seen(path), 2, "{path}");
    }
    assert_kept(&proxy, &origin, "/c/small", &[]);

    // Forty answers of 40 kB fill more than max_bytes: older ones make room.
    for i in 0..40 {
        let path = format!("/c/fill/{i}");
        origin.set(&path, Answer::cache_control("max-age=60").size(40_000));
        assert_eq!(proxy.get(&path).body.len(), 40_000);
    }
    // At most as many 40 kB answers as fit, besides /c/small and the note kept for each answer
    // too large to keep (the two above): which of them stay depends on how the keys fall into
    // the cache's shards.
    let most = (MAX_BYTES / 40_000) as f64 + 3.0;
    let mut text = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            text = proxy.metrics();
            let bytes = metric_value(&text, "gatehouse_cache_bytes").unwrap_or(0.0);
            let entries = metric_value(&text, "gatehouse_cache_entries").unwrap_or(0.0);
            bytes > 0.0 && bytes <= MAX_BYTES as f64 && entries >= 1.0 && entries <= most
        }),
        "more than max_bytes ({MAX_BYTES}) or {most} entries held:\n{text}"
    );
}

/// `gatehouse check` on a config of a pool `app`, the `/api/` route and `tables` after it
/// (its first route is `routes[1]`): the exit code and the output.
fn check(dir: &Path, tables: &str) -> (i32, String) {
    let users = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/users");
    let config = dir.join("gatehouse.toml");
    std::fs::create_dir_all(dir.join("files")).expect("files dir");
    std::fs::write(
        &config,
        format!(
            "[backend]\nusers_file = {:?}\n\n[upstreams.app]\nservers = [\"127.0.0.1:9\"]\n\n\
             [[routes]]\nprefix = \"/api/\"\nupstream = \"backends\"\n\n{tables}",
            users.display().to_string()
        ),
    )
    .expect("write the config");
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("GATEHOUSE_JWT_SECRET")
        .output()
        .expect("run gatehouse");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn check_takes_cache_settings_only_on_upstream_routes_and_within_max_ttl() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (code, out) = check(
        dir.path(),
        "[cache]\nmax_bytes = 67108864\nmax_object_bytes = 1048576\nlock_timeout = \"5s\"\n\n\
         [[routes]]\nprefix = \"/c/\"\nupstream = \"app\"\n[routes.cache]\nmax_ttl = \"10m\"\n\
         default_ttl = \"1m\"\nstale_while_revalidate = \"30s\"\nstale_if_error = \"1m\"\n",
    );
    assert_eq!(code, 0, "{out}");

    for (route, key) in [
        (
            "prefix = \"/files/\"\nstatic_dir = \"files\"",
            "routes[1].cache:",
        ),
        (
            "prefix = \"/old/\"\nredirect = \"/api/\"",
            "routes[1].cache:",
        ),
        (
            "prefix = \"/c/\"\nupstream = \"app\"\n[routes.cache]\nmax_ttl = \"1m\"\n\
             default_ttl = \"2m\"",
            "routes[1].cache.default_ttl:",
        ),
        // Above the default max_ttl, 1h.
        (
            "prefix = \"/c/\"\nupstream = \"app\"\n[routes.cache]\ndefault_ttl = \"2h\"",
            "routes[1].cache.default_ttl:",
        ),
    ] {
        let cache = if route.contains("[routes.cache]") {
            ""
        } else {
            "\n[routes.cache]\nmax_ttl = \"1m\""
        };
        let (code, out) = check(dir.path(), &format!("[[routes]]\n{route}{cache}\n"));
        assert_eq!(code, 2, "{route}: {out}");
        assert!(out.contains(key), "{route} should name {key}: {out}");
    }
}

/// What a client sends beyond the key must not choose what others get: a `HEAD` or a range
/// in the revalidation window refreshes nothing (its answer has no body to keep), and a
/// refresh a request with a cookie starts keeps only a `public` answer.
#[test]
fn a_refresh_keeps_only_what_any_get_would_have_been_given() {
    let origin = Origin::start();
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    let revalidated = Answer::cache_control("max-age=1, stale-while-revalidate=30");
    origin.set("/c/head", revalidated.clone());
    let kept = proxy.get("/c/head");
    assert_eq!(kept.cache, "MISS");
    let head = send(proxy.request(reqwest::Method::HEAD, "/c/head"));
    assert_eq!(head.cache, "HIT");
    thread::sleep(Duration::from_millis(1100));
    for headers in [&[][..], &[("range", "bytes=0-3")][..]] {
        let mut request = proxy.request(reqwest::Method::HEAD, "/c/head");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        assert_eq!(send(request).cache, "STALE");
    }
    let get = proxy.get("/c/head");
    assert_eq!((get.cache.as_str(), &get.body), ("STALE", &kept.body));
    assert_eq!(get.length, Some(kept.body.len()));

    // A public answer, then one for this cookie only.
    origin.set(
        "/c/mine",
        Answer::cache_control("public, max-age=1, stale-while-revalidate=30"),
    );
    let public = proxy.get("/c/mine");
    origin.set("/c/mine", revalidated);
    thread::sleep(Duration::from_millis(1100));
    let with_cookie = proxy.get_with("/c/mine", &[("cookie", "session=alice")]);
    assert_eq!(with_cookie.cache, "STALE");
    assert!(wait_until(Duration::from_secs(5), || origin
        .seen("/c/mine")
        == 2));
    thread::sleep(Duration::from_millis(200));
    let anonymous = proxy.get("/c/mine");
    assert_eq!(
        (anonymous.cache.as_str(), &anonymous.body),
        ("STALE", &public.body),
        "alice's answer was kept for everyone"
    );
}

/// Everything the backend gets that could change its answer is in the key: the port in the
/// host, and the forwarding headers some frameworks build links from.
#[test]
fn a_client_cannot_have_its_own_answer_kept_for_others() {
    let origin = Origin::start();
    origin.set("/c/links", Answer::cache_control("max-age=60"));
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    let plain = proxy.get_with("/c/links", &[("host", "a.example")]);
    assert_eq!(plain.cache, "MISS");
    for headers in [
        [("host", "a.example:1337"), ("x-cache-test", "-")],
        [("host", "a.example"), ("x-forwarded-host", "evil.example")],
        [("host", "a.example"), ("x-http-method-override", "DELETE")],
        [("host", "a.example"), ("forwarded", "host=evil.example")],
    ] {
        let own = proxy.get_with("/c/links", &headers);
        assert_eq!(own.cache, "MISS", "{headers:?}");
        assert_ne!(own.body, plain.body, "{headers:?}");
        let again = proxy.get_with("/c/links", &[("host", "a.example")]);
        assert_eq!(
            (again.cache.as_str(), &again.body),
            ("HIT", &plain.body),
            "{headers:?}"
        );
    }
}

/// A request that changes a resource through the edge makes the cache forget it (RFC 9111
/// 4.4); one that failed does not.
#[test]
fn a_successful_change_forgets_the_kept_response() {
    let origin = Origin::start();
    origin.set("/c/doc", Answer::cache_control("max-age=60"));
    let proxy = Proxy::start(&origin, "", &[("/c/", "")]);
    let kept = assert_kept(&proxy, &origin, "/c/doc", &[]);
    origin.set("/c/doc", Answer::cache_control("max-age=60").status(404));
    let refused = send(proxy.request(reqwest::Method::DELETE, "/c/doc"));
    assert_eq!((refused.status, refused.cache.as_str()), (404, "BYPASS"));
    assert_eq!(
        proxy.get("/c/doc").body,
        kept.body,
        "a failed DELETE changes nothing"
    );
    origin.set("/c/doc", Answer::cache_control("max-age=60"));
    let deleted = send(proxy.request(reqwest::Method::DELETE, "/c/doc"));
    assert_eq!(deleted.status, 200);
    let after = proxy.get("/c/doc");
    assert_eq!(after.cache, "MISS");
    assert_ne!(after.body, kept.body);
}
