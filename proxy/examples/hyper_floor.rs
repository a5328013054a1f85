//! The least a proxy on hyper does per request: a measuring instrument, not part of gatehouse.
//!
//! `scripts/callgrind.py --floor` counts it beside `pingora_floor.rs`, so that what another
//! HTTP stack would cost on the request path is measured rather than estimated. It has none of
//! gatehouse's work: every request goes, unchanged, to one backend's Unix socket, over an
//! upstream connection of the client connection's own (opened on its first request, kept while
//! it lives). hyper's HTTP/1 server and client, one thread.
//!
//! ```text
//! hyper_floor --listen 127.0.0.1:8080 --upstream /run/b1.sock
//! ```

use std::{path::PathBuf, process::ExitCode, rc::Rc};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::http1::{self as client, SendRequest},
    server::conn::http1 as server,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, UnixStream},
    sync::Mutex,
    task::LocalSet,
};

type Upstream = Rc<Mutex<Option<SendRequest<Incoming>>>>;

/// Sends `request` on the client connection's upstream connection, opening it if it has none
/// or the last one closed. Not retried: a backend closing an idle connection just as it is
/// reused fails the request, which the backends' 75 s idle timeout keeps out of a measured run.
async fn forward(
    socket: Rc<PathBuf>,
    upstream: Upstream,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let mut held = upstream.lock().await;
    let ready = match held.as_mut() {
        Some(sender) => sender.ready().await.is_ok(),
        None => false,
    };
    if !ready {
        let stream = UnixStream::connect(socket.as_path()).await?;
        let (sender, connection) = client::handshake(TokioIo::new(stream)).await?;
        tokio::task::spawn_local(connection);
        *held = Some(sender);
    }
    let sender = held.as_mut().ok_or("no upstream connection")?;
    Ok(sender.send_request(request).await?)
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<(String, PathBuf), String> {
    let (mut listen, mut upstream) = (None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--upstream" => upstream = Some(PathBuf::from(value)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    listen
        .zip(upstream)
        .ok_or_else(|| "give --listen ADDRESS and --upstream SOCKET".into())
}

async fn serve(listen: String, socket: PathBuf) -> std::io::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    let socket = Rc::new(socket);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors, say: the next accept may succeed.
            Err(e) => {
                eprintln!("hyper_floor: accept: {e}");
                continue;
            }
        };
        let socket = socket.clone();
        let upstream: Upstream = Rc::new(Mutex::new(None));
        tokio::task::spawn_local(async move {
            let service =
                service_fn(move |request| forward(socket.clone(), upstream.clone(), request));
            // hyper closes the client connection without an answer when `forward` fails (the
            // backend's socket missing, say): said here, or a run would only see a hang.
            if let Err(e) = server::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
                && !e.is_incomplete_message()
            {
                eprintln!("hyper_floor: {e}: {:?}", std::error::Error::source(&e));
            }
        });
    }
}

fn main() -> ExitCode {
    let (listen, socket) = match parse(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("hyper_floor: {message}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hyper_floor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match LocalSet::new().block_on(&runtime, serve(listen, socket)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyper_floor: {e}");
            ExitCode::FAILURE
        }
    }
}
