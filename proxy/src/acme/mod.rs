//! Automatic HTTPS (RFC 8555): a certificate for each of the listener's names from an ACME
//! server, ordered at start, renewed in the background and served from the moment it arrives;
//! until then, and whenever an order fails, the certificate already served stays.
//!
//! - [`challenges`]: the answers the ACME server checks, HTTP-01 on the HTTP listener and
//!   TLS-ALPN-01 in the HTTPS handshake.
//! - [`order`]: one order for one name.
//! - [`store`]: the account and the certificates on disk.
//! - [`Renewer`]: when each name is ordered, and what a failure does.

pub mod challenges;
pub mod order;
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

/// What the listeners read, shared with the [`Renewer`].
pub struct Acme {
    settings: AcmeSettings,
    store: Store,
    /// The certificates issued so far, by name; replaced whole when one arrives.
    issued: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    pub challenges: Arc<Challenges>,
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
        let acme = Self {
            settings,
            store,
            issued: ArcSwap::default(),
            challenges: Arc::default(),
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

    async fn account(&self) -> Result<Account, String> {
        let builder = match &self.settings.trust {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        }
        .map_err(|e| format!("ACME client: {e}"))?;
        if let Some(json) = self.store.account() {
            let credentials = serde_json::from_slice(&json)
                .map_err(|e| format!("the stored account is unreadable: {e}"))?;
            return builder
                .from_credentials(credentials)
                .await
                .map_err(|e| format!("account: {e}"));
        }
        let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
        let new = NewAccount {
            contact: &contact,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, credentials) = builder
            .create(&new, self.settings.directory.clone(), None)
            .await
            .map_err(|e| format!("new account: {e}"))?;
        let json = serde_json::to_vec(&credentials).map_err(|e| format!("account: {e}"))?;
        self.store
            .save_account(&json)
            .map_err(|e| format!("cannot store the account: {e}"))?;
        Ok(account)
    }

    /// Orders `name`, stores and serves what arrives; returns when to order it next.
    async fn renew(&self, account: &Account, name: &str) -> Result<SystemTime, String> {
        let issued =
            order::obtain(account, name, self.settings.challenge, &self.challenges).await?;
        let whole = format!("{}\n{}", issued.chain_pem.trim_end(), issued.key_pem);
        let stored = store::parse(whole.as_bytes())
            .map_err(|e| format!("the issued certificate is unusable: {e}"))?;
        // Served even if it cannot be stored: a restart would order it again, no worse.
        self.install(name, &stored);
        if let Err(error) = self
            .store
            .save_certificate(name, &issued.chain_pem, &issued.key_pem)
        {
            tracing::error!(name, %error, "cannot store the issued certificate");
        }
        Ok(self.renewal_due(&stored))
    }
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
            .map(|name| Name {
                name: name.clone(),
                due: acme
                    .store
                    .certificate(name)
                    .map_or(now, |stored| acme.renewal_due(&stored)),
                failures: 0,
            })
            .collect();
        let mut account = None;
        loop {
            let Some(next) = names.iter_mut().min_by_key(|n| n.due) else {
                return;
            };
            if let Some(m) = &acme.metrics {
                m.next_order
                    .with_label_values(&[next.name.as_str()])
                    .set(unix_seconds(next.due));
            }
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
            let attempt = async {
                if account.is_none() {
                    account = Some(acme.account().await?);
                }
                let Some(account) = &account else {
                    return Err("no account".to_owned());
                };
                acme.renew(account, &next.name).await
            };
            let outcome = tokio::select! {
                outcome = attempt => outcome,
                _ = shutdown.changed() => return,
            };
            let name = next.name.as_str();
            match outcome {
                Ok(due) => {
                    tracing::info!(name, directory = %acme.settings.directory, "certificate issued");
                    next.due = due;
                    next.failures = 0;
                }
                Err(error) => {
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
                }
            }
            if let Some(m) = &acme.metrics {
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
