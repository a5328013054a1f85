//! The gatehouse backend: a lean hyper 1.x server on a Unix domain socket.
//!
//! A request's path: [`server`] accepts it, [`dispatch`] finds its row in [`routes`] and
//! checks its token, a handler in [`handlers`] answers it through [`accounts`] or [`guard`],
//! which reach Redis through [`store`].
//!
//! - [`server`]: the listeners. [`serve`] takes a bound listener and a shutdown future, so
//!   tests and the process group start it the same way; it holds at most `max_connections`
//!   connections at once. [`serve_admin`] answers `GET /metrics` on its own socket, which no
//!   route of the proxy can reach.
//! - [`connection`]: header and idle deadlines on the backend's own connections, and the
//!   request body that tells them when it has been read.
//! - [`app`]: the state every request shares, built once from [`Settings`].
//! - [`routes`]: the route table: each endpoint with who may call it and its metrics label.
//! - [`dispatch`]: a request's route, its token check, its handler, its response.
//! - [`handlers`]: one file per group of endpoints, each with its request and response types.
//! - [`openapi`]: the OpenAPI document, generated from the types and the route table.
//! - [`accounts`]: users, live tokens and the generation marker, in Redis.
//! - [`guard`]: the login brute-force guard, in Redis.
//! - [`api_keys`]: API keys, made by admins and sent as `X-API-Key`, in Redis.
//! - [`audit`]: the audit log of security events, to a file and a Redis stream.
//! - [`keys`]: every Redis key, in one place; the Lua scripts are in `lua/`.
//! - [`store`]: the Redis connection, shared by every backend process and replica.
//! - [`role`]: what a user may do.
//! - [`token`]: issuing and checking HS256 JWTs.
//! - [`password`]: the password rules, argon2id, and the turns at it.
//! - [`users`]: the users file that seeds Redis.
//! - [`metrics`]: the backend's Prometheus series, served on the admin socket.
//! - [`error`], [`http_util`]: the error types, and the response helpers.
//!
//! # Errors
//!
//! Each error type says who it is for (the client, or the caller that starts the backend), so
//! none is a bare `String`:
//!
//! - A request fails with [`ApiError`] (status, stable code, message): handlers and the
//!   [`accounts`] and [`guard`] calls they make return it, and [`dispatch`] alone turns it
//!   into the `{"error","message","request_id","correlation_id"}` response. Its message is for the client:
//!   it names the field at fault, never a password, a hash or an internal detail.
//! - A Redis call fails with [`error::Unavailable`], which carries nothing: [`store`] logs
//!   the cause once when an outage starts and once when it ends, and every request it fails
//!   answers `503` with `Retry-After` (a token cannot be checked without Redis, so none is
//!   let through).
//! - Building the backend fails with [`StartError`] (a short JWT secret, a bad Redis URL, a
//!   backend id that is no header value, the metrics registry), and reading the users file
//!   with [`UsersError`] (file and line): both are returned, never logged here, to the
//!   caller, which names the setting and stops before serving.
//! - argon2id failing to hash is a [`error::HashError`]: at start-up it becomes one of those
//!   two; on a request it is logged and answered `500`.
//!
//! What is logged: our own faults at `error` with their detail while the client gets a plain
//! `500` (a damaged user record, a failed hash or signature); state changes a person should
//! see (users seeded, Redis lost its data, a user created or changed, by which admin) at
//! `warn` or `info`; a refused login at `info` with a user name only if it is a valid one.
//! A client's mistake (a bad body, a wrong token) is answered, not logged.

pub mod accounts;
pub mod api_keys;
pub mod app;
pub mod audit;
pub mod connection;
pub mod dispatch;
pub mod error;
pub mod guard;
pub mod handlers;
pub mod http_util;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod password;
pub mod role;
pub mod routes;
pub mod server;
pub mod store;
pub mod token;
pub mod users;

pub use accounts::Accounts;
pub use app::{App, AuditSettings, Settings};
pub use connection::ConnectionLimits;
pub use error::{ApiError, StartError, UsersError};
pub use guard::{Guard, GuardSettings};
pub use metrics::Metrics;
pub use role::Role;
pub use server::{bind, serve, serve_admin};
pub use store::Store;
pub use token::Tokens;
pub use users::Users;
