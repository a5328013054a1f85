//! The least a Pingora proxy does per request: a measuring instrument, not part of gatehouse.
//!
//! `scripts/callgrind.py --floor` counts this binary's instructions per request beside
//! gatehouse's and nginx's, so that what Pingora itself costs is measured rather than guessed.
//! It has none of gatehouse's work: no routes, limits, request ids, forwarding headers, metrics
//! or logs, no TLS. Two modes:
//!
//! - `--upstream SOCKET` (repeatable): every request goes round robin to the backends' Unix
//!   sockets by Pingora's own upstream path and connection pool, as Pingora's load-balancer
//!   example does.
//! - `--answer`: every request is answered from `request_filter` with a fixed small body, no
//!   upstream at all: what Pingora's proxy service costs (pingora-proxy's phases over
//!   pingora-core's HTTP/1 session) before it reaches a backend.
//!
//! ```text
//! pingora_floor --listen 127.0.0.1:8080 --threads 2 --upstream /run/b1.sock --upstream /run/b2.sock
//! pingora_floor --listen 127.0.0.1:8080 --threads 2 --answer
//! ```

use std::{
    process::ExitCode,
    sync::atomic::{AtomicUsize, Ordering},
};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::{
    prelude::*,
    server::configuration::{Opt, ServerConf},
};
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session, http_proxy_service};

/// The answer of `--answer`: 30 bytes of JSON, about a backend's answer to `/api/ping` (15
/// bytes) with its id.
const ANSWER: &[u8] = br#"{"status":"ok","backend":"b1"}"#;

struct Floor {
    peers: Vec<HttpPeer>,
    next: AtomicUsize,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        if !self.peers.is_empty() {
            return Ok(false);
        }
        let mut header = ResponseHeader::build(200, Some(2))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("content-length", ANSWER.len())?;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session
            .write_response_body(Some(Bytes::from_static(ANSWER)), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // Never reached without peers: `request_filter` has answered every request then.
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.peers.len();
        Ok(Box::new(self.peers[at].clone()))
    }
}

struct Args {
    listen: String,
    threads: usize,
    upstreams: Vec<String>,
    answer: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> std::result::Result<Args, String> {
    let mut parsed = Args {
        listen: String::new(),
        threads: 1,
        upstreams: Vec::new(),
        answer: false,
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => parsed.listen = value()?,
            "--threads" => {
                parsed.threads = value()?
                    .parse()
                    .map_err(|_| "--threads takes a number".to_string())?
            }
            "--upstream" => parsed.upstreams.push(value()?),
            "--answer" => parsed.answer = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let proxies = !parsed.upstreams.is_empty();
    if parsed.listen.is_empty() || parsed.answer == proxies {
        return Err("give --listen, and either --answer or --upstream SOCKET".into());
    }
    if parsed.threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("pingora_floor: {message}");
            return ExitCode::FAILURE;
        }
    };
    let mut peers = Vec::new();
    for socket in &args.upstreams {
        match HttpPeer::new_uds(socket, false, String::new()) {
            Ok(peer) => peers.push(peer),
            Err(e) => {
                eprintln!("pingora_floor: {socket}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let conf = ServerConf {
        threads: args.threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(Opt::default()), conf);
    server.bootstrap();
    let floor = Floor {
        peers,
        next: AtomicUsize::new(0),
    };
    let mut service = http_proxy_service(&server.configuration, floor);
    service.add_tcp(&args.listen);
    server.add_service(service);
    server.run_forever()
}
