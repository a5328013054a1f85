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
use rustls::sign::CertifiedKey;

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
    /// Renew this long before expiry, or with a third of the lifetime left if that is later.
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

/// The longest the account and the order of one turn may take together.
const TURN_DEADLINE: Duration = order::ORDER_DEADLINE.saturating_add(Duration::from_secs(30));

/// The soonest a name is ordered again after an order succeeded (or a third of the new
/// certificate's lifetime, if shorter), whatever its dates say: a clock ahead of the CA's
/// must not make it order in a loop.
const MIN_RENEWAL_WAIT: Duration = Duration::from_secs(600);

/// How soon to look again while another replica orders a name, or while Redis is away.
const WAIT_FOR_OTHERS: Duration = Duration::from_secs(5);

/// What the listeners read, shared with the [`Renewer`].
pub struct Acme {
    settings: AcmeSettings,
    store: Store,
    /// The certificates issued so far, by name; replaced whole when one arrives.
    issued: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    pub challenges: Arc<Challenges>,
    shared: Option<Shared>,
    /// The account's key thumbprint, once the account is known: with replicas, the HTTP-01
    /// answer to any token.
    thumbprint: arc_swap::ArcSwapOption<String>,
    metrics: Option<AcmeMetrics>,
}

impl Acme {
    /// Opens the store (refusing to start if it cannot be made) and serves the certificates
    /// it holds that have not expired; the renewer orders each name when it is due.
    pub fn start(
        settings: AcmeSettings,
        registry: Option<&Registry>,
    ) -> Result<(Arc<Self>, Renewer), BuildError> {
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
            thumbprint: arc_swap::ArcSwapOption::empty(),
            metrics,
        };
        let now = SystemTime::now();
        let mut names = Vec::with_capacity(acme.settings.names.len());
        for name in &acme.settings.names {
            let stored = acme.store.certificate(name);
            if let Some(stored) = stored.as_ref().filter(|s| s.not_after > now) {
                acme.install(name, stored);
            }
            let due = stored.map_or(now, |stored| acme.renewal_due(&stored));
            // A backoff a previous run started goes on.
            let (retry, failures) = acme.store.retry(name).unwrap_or((due, 0));
            names.push(Name {
                name: name.clone(),
                due: due.max(retry),
                failures,
                unavailable: 0,
            });
        }
        let acme = Arc::new(acme);
        let renewer = Renewer {
            acme: acme.clone(),
            names,
        };
        Ok((acme, renewer))
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

    /// The key authorization for HTTP-01 `token`: this proxy's own order's, or, where
    /// replicas share the account, the token with the account's key thumbprint (RFC 8555
    /// 8.1), which is the answer to any order of any replica: no replica needs to know which
    /// orders the others made, and a made-up token costs nothing. It tells a client only the
    /// thumbprint, which is public.
    pub fn http_answer(&self, token: &str) -> Option<String> {
        if let Some(answer) = self.challenges.http_answer(token) {
            return Some(answer);
        }
        self.shared.as_ref()?;
        // ACME tokens are base64url (RFC 8555 8.1).
        let plausible = (1..=128).contains(&token.len())
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let thumbprint = self.thumbprint.load_full().filter(|_| plausible)?;
        Some(format!("{token}.{thumbprint}"))
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, String> {
        client::account_builder(self.settings.trust.as_deref())
    }

    /// The account. With replicas, the one they share in Redis, which every replica must use
    /// (their HTTP-01 answers depend on it): a stored account of this replica's is offered,
    /// and a new one made only under a lock, by one replica. Alone, the stored one or a new
    /// one.
    async fn account(&self) -> Result<Account, Turn> {
        let local = self.store.account();
        let json = match (&self.shared, local) {
            (None, Some(json)) => json,
            (None, None) => self.new_account().await.map_err(Turn::Failed)?,
            (Some(shared), local) => match shared.account().await.map_err(Turn::Unavailable)? {
                Some(json) => json,
                None => match local {
                    Some(json) => shared.account_or(&json).await.map_err(Turn::Unavailable)?,
                    None => {
                        let lock = match shared.lock("account").await {
                            Ok(Some(lock)) => lock,
                            Ok(None) => return Err(Turn::Busy),
                            Err(error) => return Err(Turn::Unavailable(error)),
                        };
                        let made = self.new_account().await;
                        let shared_json = match made {
                            Ok(ours) => shared.account_or(&ours).await.map_err(Turn::Unavailable),
                            Err(error) => Err(Turn::Failed(error)),
                        };
                        shared.unlock(lock).await;
                        shared_json?
                    }
                },
            },
        };
        // Used even if it cannot be stored: failing here would make a new account at every
        // retry.
        if self.store.account().as_ref() != Some(&json)
            && let Err(error) = self.store.save_account(&json)
        {
            tracing::error!(%error, "cannot store the ACME account");
        }
        let credentials = serde_json::from_slice(&json)
            .map_err(|e| Turn::Failed(format!("the stored account is unreadable: {e}")))?;
        let account = self
            .builder()
            .map_err(Turn::Failed)?
            .from_credentials(credentials)
            .await
            .map_err(|e| Turn::Failed(format!("account: {e}")))?;
        self.thumbprint
            .store(Some(Arc::new(account.key_thumbprint().to_owned())));
        Ok(account)
    }

    async fn new_account(&self) -> Result<Vec<u8>, String> {
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
        serde_json::to_vec(&credentials).map_err(|e| format!("account: {e}"))
    }

    /// One turn at `name`: take another replica's newer certificate, wait while one orders
    /// it (or waits out a failure), or order it. Only the account and the order are under
    /// the turn's deadline, so the lock is always given back or held on purpose.
    async fn turn(&self, account: &mut Option<Account>, name: &str) -> Turn {
        let Some(shared) = &self.shared else {
            return self.timed_order(account, name).await;
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
            Ok(None) => self.timed_order(account, name).await,
            Err(error) => Turn::Unavailable(error),
        };
        match turn {
            // Every replica waits out the backoff, which the replicas count together: the
            // CA's limit on failed validations is per account and name.
            Turn::Failed(error) => match shared.hold_after_failure(&lock, name).await {
                Ok(failures) => Turn::FailedShared(error, failures),
                Err(_) => {
                    shared.unlock(lock).await;
                    Turn::Failed(error)
                }
            },
            turn => {
                if matches!(turn, Turn::Issued(_)) {
                    shared.clear_failures(name).await;
                }
                shared.unlock(lock).await;
                turn
            }
        }
    }

    async fn timed_order(&self, account: &mut Option<Account>, name: &str) -> Turn {
        match tokio::time::timeout(TURN_DEADLINE, self.order(account, name)).await {
            Ok(turn) => turn,
            Err(_) => Turn::Failed(format!("no result within {}s", TURN_DEADLINE.as_secs())),
        }
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
        let due = self.renewal_due(&stored);
        if !stored.is_for(name) || due <= SystemTime::now() {
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
                Err(turn) => return turn,
            }
        }
        let Some(current) = account.as_ref() else {
            return Turn::Failed("no account".into());
        };
        match self.renew(current, name).await {
            Ok(due) => Turn::Issued(due),
            Err(error) => {
                // An account the CA no longer knows is forgotten, here and for the replicas,
                // so the next turn makes a new one.
                if error.contains("accountDoesNotExist") {
                    *account = None;
                    self.store.remove_account();
                    if let Some(shared) = &self.shared {
                        shared.remove_account().await;
                    }
                }
                Turn::Failed(error)
            }
        }
    }

    /// Orders `name`, stores and serves what arrives; returns when to order it next.
    async fn renew(&self, account: &Account, name: &str) -> Result<SystemTime, String> {
        let issued =
            order::obtain(account, name, self.settings.challenge, &self.challenges).await?;
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
    /// Another replica is ordering it, or waiting out a failure.
    Busy,
    /// Redis did not answer: no order without the lock.
    Unavailable(String),
    Failed(String),
    /// Failed, the replicas' failures for the name so far; the lock is held for the backoff.
    FailedShared(String, u32),
}

/// The wait after `failures` failed orders in a row.
fn backoff(failures: u32) -> Duration {
    doubled(RETRY_FIRST, failures.saturating_sub(1), RETRY_CEILING)
}

/// `first` doubled `times` times, at most `ceiling`.
fn doubled(first: Duration, times: u32, ceiling: Duration) -> Duration {
    first.saturating_mul(1 << times.min(16)).min(ceiling)
}

/// Orders and renews every name, one at a time, each when it is due; a failure is logged,
/// counted and retried later, and never takes a served certificate down.
pub struct Renewer {
    acme: Arc<Acme>,
    /// Each name, and when it is first due, from what the store held at start.
    names: Vec<Name>,
}

#[async_trait]
impl BackgroundService for Renewer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let acme = &self.acme;
        let mut names = self.names.clone();
        if let Some(m) = &acme.metrics {
            for name in &names {
                let at = unix_seconds(name.due);
                m.next_order
                    .with_label_values(&[name.name.as_str()])
                    .set(at);
            }
        }
        let mut account = None;
        // With replicas, the account is needed from the start, due or not: its thumbprint
        // answers the HTTP-01 checks of the other replicas' orders.
        let mut account_due = acme.shared.as_ref().map(|_| SystemTime::now());
        let mut account_tries = 0u32;
        loop {
            if account.is_some() {
                account_due = None;
            }
            if let Some(due) = account_due
                && due <= SystemTime::now()
            {
                let outcome = tokio::select! {
                    outcome = tokio::time::timeout(TURN_DEADLINE, acme.account()) => outcome,
                    _ = shutdown.changed() => return,
                };
                match outcome {
                    Ok(Ok(known)) => {
                        account = Some(known);
                        account_due = None;
                    }
                    Ok(Err(Turn::Busy)) => {
                        account_due = Some(SystemTime::now() + WAIT_FOR_OTHERS);
                    }
                    failed => {
                        account_tries = account_tries.saturating_add(1);
                        let wait =
                            doubled(WAIT_FOR_OTHERS, account_tries, Duration::from_secs(300));
                        let error = match failed {
                            Ok(Err(Turn::Failed(e) | Turn::Unavailable(e))) => e,
                            _ => format!("no account within {}s", TURN_DEADLINE.as_secs()),
                        };
                        tracing::warn!(%error, retry_in_seconds = wait.as_secs(), "no ACME account yet; this replica cannot answer the others' HTTP-01 checks");
                        account_due = Some(SystemTime::now() + wait);
                    }
                }
            }
            let Some(next) = names.iter_mut().min_by_key(|n| n.due) else {
                return;
            };
            // At most an hour at a time, so a clock set forward is noticed.
            let wake = account_due.map_or(next.due, |a| a.min(next.due));
            let wait = wake
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(Duration::from_secs(3600));
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            if next.due > SystemTime::now() {
                continue;
            }
            let turn = tokio::select! {
                turn = acme.turn(&mut account, &next.name) => turn,
                _ = shutdown.changed() => return,
            };
            let name = next.name.as_str();
            let turn_failures = match &turn {
                Turn::FailedShared(_, failures) => Some(*failures),
                _ => None,
            };
            if !matches!(turn, Turn::Unavailable(_)) {
                next.unavailable = 0;
            }
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
                    // Each warning further apart, up to a minute, while Redis stays away.
                    next.unavailable = next.unavailable.saturating_add(1);
                    let wait = doubled(WAIT_FOR_OTHERS, next.unavailable, Duration::from_secs(60));
                    tracing::warn!(name, %error, retry_in_seconds = wait.as_secs(), "cannot coordinate the certificate order");
                    next.due = SystemTime::now() + wait;
                    false
                }
                Turn::Failed(error) | Turn::FailedShared(error, _) => {
                    next.failures = match turn_failures {
                        Some(shared) => shared,
                        None => next.failures.saturating_add(1),
                    };
                    let retry = backoff(next.failures);
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

#[derive(Clone)]
struct Name {
    name: String,
    due: SystemTime,
    failures: u32,
    /// Turns in a row that found Redis away.
    unavailable: u32,
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
