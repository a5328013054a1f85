//! End-to-end tests: the real binary, real sockets, a real redis-server, a real HTTP client.

mod browser;
mod util;

mod access;
// Certificates from a real ACME server (pebble).
mod accounts;
mod acme;
mod api;
// The OpenAPI document under schemathesis, and Swagger UI in a browser.
mod api_docs;
// The per-route cache of upstream responses, to a server each test programs.
mod cache;
// One backend in this process against a real Redis: its own behaviour, without a group.
mod backend_inprocess;
mod backend_limits;
// Client certificates (mTLS) made by openssl, presented by curl and rustls.
mod client_certs;
mod config;
mod connection_limits;
// The admin console (static/admin/) in a browser.
mod console;
mod drills;
// conf/examples/, run as shipped and walked through with curl.
mod examples;
mod fail_closed;
// The proxy's two paths to the backends.
mod forwarding;
// Header rules, security headers and CORS per route, on both paths and static files.
mod headers;
// Permissions by role, API keys, the audit log, the group's status for admins.
mod identity;
mod jwt;
mod observability;
mod operations;
// HTTP/1.1 requests sent before their turn.
mod pipelining;
// Named pools of servers the tests start: TCP, Unix sockets, HTTPS.
mod pools;
mod process_group;
mod redis;
// Routes that remove or replace their prefix on the way to the backend.
mod rewrite;
// Backends found in a directory: the proxy and backends run apart, as in the Swarm stack.
mod socket_dir;
mod statics;
mod tls;
// Routes and certificates per host name.
mod vhosts;
// WebSockets through the proxy.
mod websocket;
