//! The answers an ACME server checks before it issues a certificate: HTTP-01 on the HTTP
//! listener, TLS-ALPN-01 in the HTTPS listener's handshake (RFC 8555 8.3, RFC 8737). Each is
//! held only while its order waits for the check, and removed when the order is done,
//! whichever way it ends.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use rustls::sign::CertifiedKey;

/// The path prefix of HTTP-01 answers.
pub const HTTP_PATH: &str = "/.well-known/acme-challenge/";

/// The ALPN protocol of TLS-ALPN-01 handshakes.
pub const TLS_ALPN_PROTOCOL: &[u8] = b"acme-tls/1";

/// The challenges in progress. A few at a time, looked up only by ACME servers' requests:
/// a mutex is enough.
#[derive(Default, Debug)]
pub struct Challenges {
    /// HTTP-01: token to key authorization.
    http: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: the name under validation to its challenge certificate.
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// The key authorization for the HTTP-01 `token`.
    pub fn http_answer(&self, token: &str) -> Option<String> {
        lock(&self.http).get(token).cloned()
    }

    /// The TLS-ALPN-01 certificate for `name` (the client's SNI, without a final dot).
    pub fn tls_alpn_certificate(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        lock(&self.tls_alpn).get(name?).cloned()
    }

    /// Answers HTTP-01 `token` with `key_authorization` until the guard is dropped.
    pub fn answer_http(self: &Arc<Self>, token: &str, key_authorization: &str) -> Answering {
        lock(&self.http).insert(token.to_owned(), key_authorization.to_owned());
        Answering {
            challenges: self.clone(),
            key: Key::Http(token.to_owned()),
        }
    }

    /// Presents `certificate` to TLS-ALPN-01 handshakes for `name` until the guard is dropped.
    pub fn answer_tls_alpn(self: &Arc<Self>, name: &str, certificate: CertifiedKey) -> Answering {
        lock(&self.tls_alpn).insert(name.to_owned(), Arc::new(certificate));
        Answering {
            challenges: self.clone(),
            key: Key::TlsAlpn(name.to_owned()),
        }
    }
}

/// A lock that a panic elsewhere cannot make unusable: the maps hold plain values, whole after
/// any insert or remove.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Key {
    Http(String),
    TlsAlpn(String),
}

/// One challenge answered; dropping it takes the answer down.
pub struct Answering {
    challenges: Arc<Challenges>,
    key: Key,
}

impl Drop for Answering {
    fn drop(&mut self) {
        match &self.key {
            Key::Http(token) => {
                lock(&self.challenges.http).remove(token);
            }
            Key::TlsAlpn(name) => {
                lock(&self.challenges.tls_alpn).remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_lasts_as_long_as_its_guard() {
        let challenges = Arc::new(Challenges::default());
        let guard = challenges.answer_http("tok", "tok.thumb");
        assert_eq!(challenges.http_answer("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(challenges.http_answer("other"), None);
        drop(guard);
        assert_eq!(challenges.http_answer("tok"), None);
    }
}
