//! The HTTP/1 header checks, fed as a client would trickle them: the first byte sets the size
//! of each read, the rest is the request. Checked: no panic; a header that is whole is never
//! missed by `may_end` (the connection would wait for bytes that never come); the reading
//! stops where the connection's loop would, at a header end within the bytes read; and empty
//! lines before the request line change nothing (RFC 9112, 2.2).
#![no_main]

use std::time::Duration;

use gatehouse_proxy::{
    RequestLimits,
    framing::{self, Look},
};
use libfuzzer_sys::fuzz_target;

const LIMITS: RequestLimits = RequestLimits {
    max_body_bytes: 1000,
    max_header_bytes: 1024,
    max_headers: 32,
    header_timeout: Duration::from_secs(1),
    body_timeout: Duration::from_secs(1),
    max_connections: 1,
    max_connections_per_client: 1,
    send_timeout: Duration::from_secs(1),
    tls_handshake_timeout: Duration::from_secs(1),
    max_upstream_requests_per_client: 1,
    max_requests_per_connection: 1,
    upgrade_idle_timeout: Duration::from_secs(60),
    max_upgraded_per_client: 1,
};

fuzz_target!(|data: &[u8]| {
    let Some((&read_size, request)) = data.split_first() else {
        return;
    };
    let read_size = 1 + usize::from(read_size % 32);
    trickle(request, read_size);
    one_blank_line_more(request);
});

/// The connection's loop (`connection::read_h1_header`), one read of `read_size` bytes at a
/// time.
fn trickle(request: &[u8], read_size: usize) {
    let mut looked = 0;
    let mut read = read_size.min(request.len());
    loop {
        let buf = &request[..read];
        let look = if framing::may_end(buf, looked) {
            framing::look_h1(buf, &LIMITS)
        } else {
            let look = framing::look_h1(buf, &LIMITS);
            assert!(
                !matches!(look, Look::Complete(_)),
                "may_end({buf:?}, {looked}) hid a whole header"
            );
            Look::Partial
        };
        match look {
            Look::Complete(head) => {
                // The header ends within what was read, where the next request would start.
                assert!(
                    head.len <= buf.len(),
                    "{head:?} past the {} bytes read",
                    buf.len()
                );
                return;
            }
            Look::Refuse(_) => return,
            Look::Partial if buf.len() > LIMITS.max_header_bytes => return,
            Look::Partial => {}
        }
        if read == request.len() {
            return;
        }
        looked = read;
        read = (read + read_size).min(request.len());
    }
}

fn one_blank_line_more(request: &[u8]) {
    let blank = request
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    // Past four blank bytes the request is refused; the header size counts them too.
    if blank + 2 > 4 || request.len() + 2 > LIMITS.max_header_bytes {
        return;
    }
    let mut padded = b"\r\n".to_vec();
    padded.extend_from_slice(request);
    // The header is longer by the empty line; nothing else may change.
    let expected = match framing::look_h1(request, &LIMITS) {
        Look::Complete(head) => Look::Complete(framing::Head {
            len: head.len + 2,
            ..head
        }),
        other => other,
    };
    assert_eq!(
        framing::look_h1(&padded, &LIMITS),
        expected,
        "a leading CRLF changed the verdict on {request:?}"
    );
}
