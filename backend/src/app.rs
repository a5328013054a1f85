//! The backend's state: [`App`], built once at start-up from [`Settings`] and shared by every
//! request.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use http::HeaderValue;

use crate::{
    accounts::Accounts,
    api_keys::ApiKeys,
    audit::Audit,
    error::StartError,
    guard::{Guard, GuardSettings},
    metrics::Metrics,
    store::Store,
    token::Tokens,
    users::Users,
};

/// Everything a request handler needs, built once at start-up.
pub struct App {
    pub id: String,
    /// `id` as the `X-Backend-ID` of every response.
    pub(crate) id_header: HeaderValue,
    pub tokens: Tokens,
    pub store: Arc<Store>,
    pub accounts: Accounts,
    pub guard: Guard,
    pub api_keys: ApiKeys,
    pub audit: Audit,
    /// The proxy's admin listener, which `GET /api/status` asks for the group's health.
    pub admin_address: Option<SocketAddr>,
    /// Whether the edge maps client certificates to users: only then is its
    /// `X-Gatehouse-Cert-User` believed (a header nothing should send otherwise).
    pub certificate_users: bool,
    pub max_body_bytes: usize,
    /// How long a handler waits for a request body, whole.
    pub body_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Set when the backend is about to stop: `/healthz` fails, so the proxy takes it out of
    /// rotation before it closes its socket.
    pub draining: std::sync::atomic::AtomicBool,
}

/// What [`App::new`] is built from.
pub struct Settings {
    pub id: String,
    /// The users file, copied into Redis when Redis has no users.
    pub users: Users,
    pub tokens: Tokens,
    pub store: Store,
    pub guard: GuardSettings,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    /// Live tokens a user may hold; a login past it revokes the oldest.
    pub max_tokens_per_user: usize,
    pub metrics: Arc<Metrics>,
    pub audit: AuditSettings,
    pub admin_address: Option<SocketAddr>,
    pub certificate_users: bool,
}

/// `[audit]`: where the audit events go besides the Redis stream, and the stream's cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub file: Option<PathBuf>,
    pub max_events: u64,
}

impl App {
    pub fn new(settings: Settings) -> Result<Self, StartError> {
        let Settings {
            id,
            users,
            tokens,
            store,
            guard,
            max_body_bytes,
            body_timeout,
            max_tokens_per_user,
            metrics,
            audit,
            admin_address,
            certificate_users,
        } = settings;
        let id_header = HeaderValue::from_str(&id).map_err(|_| StartError::Id(id.clone()))?;
        let store = Arc::new(store);
        let audit = Audit::new(
            store.clone(),
            audit.file.as_deref(),
            audit.max_events,
            &id,
            Some(metrics.clone()),
        )
        .map_err(|error| StartError::AuditFile {
            path: audit.file.unwrap_or_default(),
            error,
        })?;
        Ok(Self {
            id,
            id_header,
            tokens,
            accounts: Accounts::new(
                store.clone(),
                users.seed,
                max_tokens_per_user,
                metrics.clone(),
            )?,
            guard: Guard::new(store.clone(), guard, metrics.clone()),
            api_keys: ApiKeys::new(store.clone(), metrics.clone()),
            audit,
            admin_address,
            certificate_users,
            store,
            max_body_bytes,
            body_timeout,
            metrics,
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reads Redis's generation, seeding the users first if Redis has none, retrying while
    /// Redis is down. Requests that find it missing do the same, so none waits for this loop.
    pub async fn seed_users(self: Arc<Self>) {
        while self.accounts.generation().await.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
