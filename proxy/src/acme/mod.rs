//! Automatic HTTPS (RFC 8555): a certificate for each of the listener's names from an ACME
//! server, ordered at start, renewed in the background and served from the moment it arrives;
//! until then, and whenever an order fails, the certificate already served stays.
//!
//! - [`challenges`]: the answers the ACME server checks, HTTP-01 on the HTTP listener and
//!   TLS-ALPN-01 in the HTTPS handshake.
//! - [`order`]: one order for one name.
//! - [`store`]: the account and the certificates on disk.
//! - [`shared`]: one account and one order per name for replicas sharing a Redis.
//! - [`Renewer`]: when each name is ordered, and what a failure does.

pub mod challenges;
pub mod client;
pub mod order;
pub mod shared;
pub mod store;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use instant_acme::{Account, NewAccount};
use pingora::{server::ShutdownWatch, services::background::BackgroundService};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rustls::{pki_types::CertificateDer, sign::CertifiedKey};

use crate::error::BuildError;
use challenges::Challenges;
use shared::Shared;
use store::{Store, Stored};

/// The `[acme]` section, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeSettings {
    /// The ACME server's directory URL.
    pub directory: String,
    /// `mailto:` URLs for the account.
    pub contact: Vec<String>,
    /// A PEM root certificate to trust for the ACME server itself; the system's roots if
    /// `None`.
    pub trust: Option<PathBuf>,
    pub challenge: ChallengeKind,
    pub storage: PathBuf,
    /// Renew this long before expiry, or at a third of the lifetime left if that comes first.
    pub renew_before: Duration,
    /// The names to hold certificates for.
    pub names: Vec<String>,
    /// The Redis that replicas coordinate their orders through; `None`: this proxy alone.
    pub redis: Option<RedisUrl>,
}

/// A Redis URL, which may hold a password: never printed.
#[derive(Clone, PartialEq)]
pub struct RedisUrl(pub String);

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisUrl(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    Http01,
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// The first retry after a failed order; each failure doubles it, up to [`RETRY_CEILING`].
/// Let's Encrypt allows 5 failed validations per name an hour: this makes 5 in the first.
const RETRY_FIRST: Duration = Duration::from_secs(120);
const RETRY_CEILING: Duration = Duration::from_secs(3600);

/// The longest one turn at a name may take: the account, the lock and the order.
const TURN_DEADLINE: Duration = order::ORDER_DEADLINE.saturating_add(Duration::from_secs(30));

/// The soonest a name is ordered again after an order succeeded (or a third of the new
/// certificate's lifetime, if shorter), whatever its dates say: a clock ahead of the CA's
/// must not make it order in a loop.
const MIN_RENEWAL_WAIT: Duration = Duration::from_secs(600);

/// How soon to look again while another replica orders a name, or while Redis is away.
const WAIT_FOR_OTHERS: Duration = Duration::from_secs(5);

/// HTTP-01 answers looked up in Redis at once; past that, a token gets a 404 at once, so a
/// flood of made-up tokens cannot queue work on Redis.
const SHARED_LOOKUPS: usize = 16;

/// What the listeners read, shared with the [`Renewer`].
pub struct Acme {
    settings: AcmeSettings,
    store: Store,
    /// The certificates issued so far, by name; replaced whole when one arrives.
    issued: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    pub challenges: Arc<Challenges>,
    shared: Option<Shared>,
    lookups: tokio::sync::Semaphore,
    metrics: Option<AcmeMetrics>,
}

impl Acme {
    /// Opens the store (refusing to start if it cannot be made) and serves the certificates
    /// it holds that have not expired.
    pub fn new(settings: AcmeSettings, registry: Option<&Registry>) -> Result<Self, BuildError> {
        let store = Store::open(&settings.storage, &settings.directory).map_err(|source| {
            BuildError::AcmeStorage {
                path: settings.storage.clone(),
                source,
            }
        })?;
        let metrics = registry.map(AcmeMetrics::register).transpose()?;
        let shared = match &settings.redis {
            Some(url) => Some(Shared::new(&url.0, &store::dir_name(&settings.directory))?),
            None => None,
        };
        let acme = Self {
            settings,
            store,
            issued: ArcSwap::default(),
            challenges: Arc::default(),
            shared,
            lookups: tokio::sync::Semaphore::new(SHARED_LOOKUPS),
            metrics,
        };
        for name in &acme.settings.names {
            if let Some(stored) = acme.store.certificate(name)
                && stored.not_after > SystemTime::now()
            {
                acme.install(name, &stored);
            }
        }
        Ok(acme)
    }

    pub fn challenge_kind(&self) -> ChallengeKind {
        self.settings.challenge
    }

    /// The issued certificate for `name` (the client's SNI), if there is one.
    pub fn certificate(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let name = name?;
        let name = name.strip_suffix('.').unwrap_or(name);
        self.issued.load().get(name).cloned()
    }

    fn install(&self, name: &str, stored: &Stored) {
        self.issued.rcu(|issued| {
            let mut issued = HashMap::clone(issued);
            issued.insert(name.to_owned(), stored.pair.clone());
            issued
        });
        if let Some(m) = &self.metrics {
            m.expiry
                .with_label_values(&[name])
                .set(unix_seconds(stored.not_after));
        }
    }

    /// When to order `name` again, given the certificate it has.
    fn renewal_due(&self, stored: &Stored) -> SystemTime {
        let lifetime = stored
            .not_after
            .duration_since(stored.not_before)
            .unwrap_or_default();
        stored.not_after - self.settings.renew_before.min(lifetime / 3)
    }

    /// The key authorization for HTTP-01 `token`: this proxy's, or one another replica put
    /// in Redis.
    pub async fn http_answer(&self, token: &str) -> Option<String> {
        if let Some(answer) = self.challenges.http_answer(token) {
            return Some(answer);
        }
        let shared = self.shared.as_ref()?;
        // ACME tokens are base64url (RFC 8555 8.1); anything else is not looked up.
        let plausible = (1..=128).contains(&token.len())
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let _permit = self.lookups.try_acquire().ok().filter(|_| plausible)?;
        shared.http_answer(token).await
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, String> {
        client::account_builder(self.settings.trust.as_deref())
    }

    /// The account: the stored one, else the replicas' shared one, else a new one (shared
    /// with the replicas unless one of them got there first).
    async fn account(&self) -> Result<Account, String> {
        let mut known = self.store.account();
        if known.is_none()
            && let Some(shared) = &self.shared
        {
            known = shared.account().await?;
        }
        let json = match known {
            Some(json) => json,
            None => {
                let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
                let new = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (_, credentials) = self
                    .builder()?
                    .create(&new, self.settings.directory.clone(), None)
                    .await
                    .map_err(|e| format!("new account: {e}"))?;
                let ours = serde_json::to_vec(&credentials).map_err(|e| format!("account: {e}"))?;
                match &self.shared {
                    Some(shared) => shared.account_or(&ours).await?,
                    None => ours,
                }
            }
        };
        // Used even if it cannot be stored: failing here would make a new account at every
        // retry.
        if self.store.account().as_ref() != Some(&json)
            && let Err(error) = self.store.save_account(&json)
        {
            tracing::error!(%error, "cannot store the ACME account");
        }
        let credentials = serde_json::from_slice(&json)
            .map_err(|e| format!("the stored account is unreadable: {e}"))?;
        self.builder()?
            .from_credentials(credentials)
            .await
            .map_err(|e| format!("account: {e}"))
    }

    /// One turn at `name`: take another replica's newer certificate, wait while one orders
    /// it, or order it.
    async fn turn(&self, account: &mut Option<Account>, name: &str) -> Turn {
        let Some(shared) = &self.shared else {
            return self.order(account, name).await;
        };
        match self.adopt(shared, name).await {
            Ok(Some(due)) => return Turn::Adopted(due),
            Ok(None) => {}
            Err(error) => return Turn::Unavailable(error),
        }
        let lock = match shared.lock(name).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Turn::Busy,
            Err(error) => return Turn::Unavailable(error),
        };
        // Again under the lock: the holder before us may have just finished.
        let turn = match self.adopt(shared, name).await {
            Ok(Some(due)) => Turn::Adopted(due),
            Ok(None) => self.order(account, name).await,
            Err(error) => Turn::Unavailable(error),
        };
        shared.unlock(lock).await;
        turn
    }

    /// Serves the certificate for `name` another replica put in Redis, if it is newer than
    /// renewal time; when it is next due.
    async fn adopt(&self, shared: &Shared, name: &str) -> Result<Option<SystemTime>, String> {
        let Some(pem) = shared.certificate(name).await? else {
            return Ok(None);
        };
        let Ok(stored) = store::parse(&pem) else {
            tracing::warn!(
                name,
                "the certificate shared in Redis is unusable; ordering anew"
            );
            return Ok(None);
        };
        let names = stored
            .pair
            .end_entity_cert()
            .ok()
            .and_then(certificate_names);
        let due = self.renewal_due(&stored);
        if !names.is_some_and(|n| n.iter().any(|n| n == name)) || due <= SystemTime::now() {
            return Ok(None);
        }
        self.install(name, &stored);
        if let Err(error) = self.store.save_certificate(name, &pem) {
            tracing::error!(name, %error, "cannot store the certificate");
        }
        Ok(Some(due))
    }

    async fn order(&self, account: &mut Option<Account>, name: &str) -> Turn {
        if account.is_none() {
            match self.account().await {
                Ok(new) => *account = Some(new),
                Err(error) => return Turn::Failed(error),
            }
        }
        let Some(account) = account.as_ref() else {
            return Turn::Failed("no account".into());
        };
        match self.renew(account, name).await {
            Ok(due) => Turn::Issued(due),
            Err(error) => Turn::Failed(error),
        }
    }

    /// Orders `name`, stores and serves what arrives; returns when to order it next.
    async fn renew(&self, account: &Account, name: &str) -> Result<SystemTime, String> {
        let answers = order::Answers {
            local: &self.challenges,
            shared: self.shared.as_ref(),
        };
        let issued = order::obtain(account, name, self.settings.challenge, &answers).await?;
        let whole = store::whole(&issued.chain_pem, &issued.key_pem);
        let stored = store::parse(whole.as_bytes())
            .map_err(|e| format!("the issued certificate is unusable: {e}"))?;
        // Served even if it cannot be stored: a restart would order it again, no worse.
        self.install(name, &stored);
        if let Err(error) = self.store.save_certificate(name, whole.as_bytes()) {
            tracing::error!(name, %error, "cannot store the issued certificate");
        }
        if let Some(shared) = &self.shared
            && let Err(error) = shared.put_certificate(name, &whole).await
        {
            tracing::error!(name, %error, "cannot share the issued certificate");
        }
        // Never at once again, whatever the dates say (a clock ahead of the CA's).
        let lifetime = stored.not_after.duration_since(stored.not_before);
        let least = lifetime.unwrap_or_default() / 3;
        Ok(self
            .renewal_due(&stored)
            .max(SystemTime::now() + least.min(MIN_RENEWAL_WAIT)))
    }
}

/// What one turn at a name came to.
enum Turn {
    /// Ordered here; next due then.
    Issued(SystemTime),
    /// Another replica's, taken; next due then.
    Adopted(SystemTime),
    /// Another replica is ordering it.
    Busy,
    /// Redis did not answer: no order without the lock.
    Unavailable(String),
    Failed(String),
}

/// Orders and renews every name, one at a time, each when it is due; a failure is logged,
/// counted and retried later, and never takes a served certificate down.
pub struct Renewer(pub Arc<Acme>);

#[async_trait]
impl BackgroundService for Renewer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let acme = &self.0;
        let now = SystemTime::now();
        let mut names: Vec<Name> = acme
            .settings
            .names
            .iter()
            .map(|name| {
                let due = acme
                    .store
                    .certificate(name)
                    .map_or(now, |stored| acme.renewal_due(&stored));
                // A backoff a previous run started goes on.
                let (retry, failures) = acme.store.retry(name).unwrap_or((due, 0));
                Name {
                    name: name.clone(),
                    due: due.max(retry),
                    failures,
                }
            })
            .collect();
        if let Some(m) = &acme.metrics {
            for name in &names {
                let at = unix_seconds(name.due);
                m.next_order
                    .with_label_values(&[name.name.as_str()])
                    .set(at);
            }
        }
        let mut account = None;
        loop {
            let Some(next) = names.iter_mut().min_by_key(|n| n.due) else {
                return;
            };
            // At most an hour at a time, so a clock set forward is noticed.
            let wait = next
                .due
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(Duration::from_secs(3600));
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            // One deadline over the account and the order: neither may stall the renewals.
            let turn = tokio::time::timeout(TURN_DEADLINE, acme.turn(&mut account, &next.name));
            let turn = tokio::select! {
                turn = turn => turn.unwrap_or_else(|_| {
                    Turn::Failed(format!("no result within {}s", TURN_DEADLINE.as_secs()))
                }),
                _ = shutdown.changed() => return,
            };
            let name = next.name.as_str();
            let ordered = match turn {
                Turn::Issued(due) => {
                    tracing::info!(name, directory = %acme.settings.directory, "certificate issued");
                    next.due = due;
                    next.failures = 0;
                    acme.store.clear_retry(name);
                    true
                }
                Turn::Adopted(due) => {
                    tracing::info!(name, "certificate another replica ordered, served");
                    next.due = due;
                    next.failures = 0;
                    acme.store.clear_retry(name);
                    false
                }
                Turn::Busy => {
                    next.due = SystemTime::now() + WAIT_FOR_OTHERS;
                    false
                }
                Turn::Unavailable(error) => {
                    tracing::warn!(name, %error, "cannot coordinate the certificate order; trying again soon");
                    next.due = SystemTime::now() + WAIT_FOR_OTHERS;
                    false
                }
                Turn::Failed(error) => {
                    next.failures = next.failures.saturating_add(1);
                    let retry = RETRY_FIRST
                        .saturating_mul(1 << (next.failures - 1).min(10))
                        .min(RETRY_CEILING);
                    tracing::warn!(
                        name,
                        %error,
                        retry_in_seconds = retry.as_secs(),
                        "certificate order failed; the certificate served now serves on"
                    );
                    next.due = SystemTime::now() + retry;
                    if let Err(error) = acme.store.save_retry(name, next.due, next.failures) {
                        tracing::error!(name, %error, "cannot store the time of the next attempt");
                    }
                    true
                }
            };
            if let Some(m) = &acme.metrics {
                m.next_order
                    .with_label_values(&[name])
                    .set(unix_seconds(next.due));
            }
            if ordered && let Some(m) = &acme.metrics {
                let result = if next.failures == 0 {
                    "issued"
                } else {
                    "failed"
                };
                m.orders.with_label_values(&[name, result]).inc();
                m.last_success
                    .with_label_values(&[name])
                    .set(i64::from(next.failures == 0));
            }
        }
    }
}

struct Name {
    name: String,
    due: SystemTime,
    failures: u32,
}

struct AcmeMetrics {
    orders: IntCounterVec,
    expiry: IntGaugeVec,
    next_order: IntGaugeVec,
    last_success: IntGaugeVec,
}

impl AcmeMetrics {
    fn register(registry: &Registry) -> Result<Self, BuildError> {
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["name"]);
        let metrics = Self {
            orders: IntCounterVec::new(
                Opts::new(
                    "gatehouse_acme_orders_total",
                    "Certificate orders by name and result (issued, failed).",
                ),
                &["name", "result"],
            )?,
            expiry: gauge(
                "gatehouse_acme_certificate_expiry_timestamp_seconds",
                "When the certificate served for the name expires.",
            )?,
            next_order: gauge(
                "gatehouse_acme_next_order_timestamp_seconds",
                "When the name is next ordered: its renewal, or the retry after a failure.",
            )?,
            last_success: gauge(
                "gatehouse_acme_last_order_success",
                "1 if the name's last order succeeded, 0 if it failed.",
            )?,
        };
        registry.register(Box::new(metrics.orders.clone()))?;
        registry.register(Box::new(metrics.expiry.clone()))?;
        registry.register(Box::new(metrics.next_order.clone()))?;
        registry.register(Box::new(metrics.last_success.clone()))?;
        Ok(metrics)
    }
}

fn unix_seconds(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The DNS names a certificate is for, in lower case.
pub fn certificate_names(der: &CertificateDer<'_>) -> Option<Vec<String>> {
    crate::tls::dns_names(der)
}
