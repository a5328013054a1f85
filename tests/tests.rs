//! End-to-end tests: the real binary, real sockets, a real redis-server, a real HTTP client.

mod browser;
mod util;

mod access;
mod accounts;
mod api;
mod backend_limits;
mod config;
mod connection_limits;
mod drills;
mod fail_closed;
mod jwt;
mod observability;
mod operations;
mod process_group;
mod redis;
mod statics;
mod tls;
