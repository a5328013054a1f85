//! The HTTPS listener's TLS: the certificate pair, loaded and checked here (Pingora would
//! panic on a bad one), and counters of handshakes begun and completed.

use std::{path::Path, sync::Arc};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::{
    listeners::{PreTlsProcess, TlsAccept, TlsAcceptCallbacks, tls::TlsSettings},
    protocols::{Peek, l4::stream::Stream as L4Stream, tls::TlsRef},
};
use prometheus::IntCounter;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Reads a PEM certificate chain and private key and checks that they belong together.
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|iter| iter.collect::<Result<_, _>>())
        .map_err(|e| {
            format!(
                "{}: cannot read a PEM certificate: {e}",
                cert_path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in the file",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("{}: cannot read a PEM private key: {e}", key_path.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unusable private key: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not match the certificate {}: {e}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// The certificate the listener presents; a reload stores a new one, which the next
/// handshake uses.
pub type CertificateSlot = Arc<ArcSwap<CertifiedKey>>;

/// TLS settings for the listener: the pair in `slot`, HTTP/2 and HTTP/1.1 by ALPN, and the
/// handshake counters. rustls offers TLS 1.2 and 1.3 with AEAD suites only.
pub fn settings(slot: CertificateSlot, completed: IntCounter) -> Result<TlsSettings, String> {
    let callbacks: TlsAcceptCallbacks = Box::new(CountCompleted(completed));
    let mut settings =
        TlsSettings::with_callbacks(callbacks).map_err(|e| format!("TLS settings: {e}"))?;
    settings.set_cert_resolver(Arc::new(CurrentCertificate(slot)));
    settings.enable_h2();
    Ok(settings)
}

#[derive(Debug)]
struct CurrentCertificate(CertificateSlot);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

struct CountCompleted(IntCounter);

#[async_trait]
impl TlsAccept for CountCompleted {
    async fn handshake_complete_callback(
        &self,
        _tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        self.0.inc();
        None
    }
}

/// Runs before each handshake: counts the handshakes begun, that is connections whose first
/// byte opens a TLS handshake record (so TCP probes and port scans are not counted as failed
/// handshakes). The byte is peeked, not consumed.
pub struct CountBegun(pub IntCounter);

/// The TLS record type of a handshake message (RFC 8446, 5.1).
const HANDSHAKE_RECORD: u8 = 0x16;

#[async_trait]
impl PreTlsProcess for CountBegun {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let mut first = [0u8; 1];
        // A connection that closes before sending a byte fails in the handshake that follows.
        if matches!(stream.try_peek(&mut first).await, Ok(true)) && first[0] == HANDSHAKE_RECORD {
            self.0.inc();
        }
        Ok(())
    }
}
