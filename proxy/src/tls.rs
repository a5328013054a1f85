//! The HTTPS listener's TLS: the certificate pair, loaded and checked here (Pingora would
//! panic on a bad one), and the handshake, with its deadline and counters.

use std::{path::Path, sync::Arc, time::Instant};

use arc_swap::ArcSwap;
use pingora::{
    listeners::tls::Acceptor,
    protocols::{Peek, Stream, l4::stream::Stream as L4Stream},
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{
    error::BuildError,
    metrics::{Cut, Metrics},
};

/// Reads a PEM certificate chain and private key and checks that they belong together.
pub fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, BuildError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|iter| iter.collect::<Result<_, _>>())
        .map_err(|source| BuildError::Certificate {
            path: cert_path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(BuildError::NoCertificate(cert_path.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| BuildError::PrivateKey {
        path: key_path.to_owned(),
        source,
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| BuildError::UnusableKey {
            path: key_path.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified
        .keys_match()
        .map_err(|source| BuildError::KeyMismatch {
            key: key_path.to_owned(),
            cert: cert_path.to_owned(),
            source,
        })?;
    Ok(Arc::new(certified))
}

/// The certificate the listener presents; a reload stores a new one, which the next
/// handshake uses.
pub type CertificateSlot = Arc<ArcSwap<CertifiedKey>>;

/// The HTTPS listener's handshakes. They are made by [`crate::connection`], after the
/// connection is counted against the caps and under its own deadline: Pingora's listeners
/// would make them before either, allow each 60 s, and log every failure on its own line.
pub struct Handshake {
    acceptor: Acceptor,
    metrics: Option<Arc<Metrics>>,
}

/// The TLS record type of a handshake message (RFC 8446, 5.1).
const HANDSHAKE_RECORD: u8 = 0x16;

impl Handshake {
    /// TLS 1.2 and 1.3 with rustls's AEAD suites in the server's order of preference (Mozilla
    /// "intermediate"), the pair in `slot`, and HTTP/2 and HTTP/1.1 by ALPN.
    pub fn new(slot: CertificateSlot, metrics: Option<Arc<Metrics>>) -> Result<Self, BuildError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(BuildError::TlsSettings)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(CurrentCertificate(slot)));
        // The strongest suite both sides have, rather than the client's first choice.
        config.ignore_client_order = true;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: Acceptor::from_server_config(Arc::new(config)),
            metrics,
        })
    }

    /// The TLS stream, or `None` when the handshake failed or missed `deadline` (counted, not
    /// logged: on a public port these are scanners and floods, one line each would bury the
    /// log).
    pub async fn accept(&self, stream: Stream, deadline: Instant) -> Option<Stream> {
        // The listener is plain TCP, so the stream is the socket itself.
        let mut socket = stream.into_any().downcast::<L4Stream>().ok()?;
        let metrics = self.metrics.as_deref();
        let mut begun = false;
        let handshake = async {
            let mut first = [0u8; 1];
            // Begun only when it opens with a handshake record, so port scans and plain-HTTP
            // mistakes do not read as failed handshakes.
            begun = matches!(socket.try_peek(&mut first).await, Ok(true))
                && first[0] == HANDSHAKE_RECORD;
            if begun && let Some(m) = metrics {
                m.tls_connections.inc();
            }
            self.acceptor.tls_handshake(*socket).await
        };
        let outcome = tokio::time::timeout_at(deadline.into(), handshake).await;
        let failure = match outcome {
            Ok(Ok(tls)) => {
                if let Some(m) = metrics {
                    m.tls_handshakes.inc();
                }
                return Some(Box::new(tls));
            }
            Ok(Err(_)) if begun => Cut::TlsHandshakeError,
            Ok(Err(_)) => return None,
            Err(_) => Cut::TlsHandshakeTimeout,
        };
        if let Some(m) = metrics {
            m.cut(failure);
        }
        None
    }
}

#[derive(Debug)]
struct CurrentCertificate(CertificateSlot);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_picks_the_cipher_suite() {
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, pair.cert.pem()).unwrap();
        std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
        let slot = Arc::new(ArcSwap::new(load_certified_key(&cert, &key).unwrap()));
        let handshake = Handshake::new(slot, None).unwrap();
        let config = handshake.acceptor.acceptor.config();
        assert!(config.ignore_client_order);
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        // Only AEAD suites, the 256-bit ones first (rustls's order).
        let suites: Vec<String> = config
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert!(
            suites
                .iter()
                .all(|s| s.contains("GCM") || s.contains("CHACHA20"))
        );
        assert_eq!(
            suites.first().map(String::as_str),
            Some("TLS13_AES_256_GCM_SHA384")
        );
    }
}
