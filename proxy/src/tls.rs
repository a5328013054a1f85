//! The HTTPS listener's TLS: the certificate pair, loaded and checked here (Pingora would
//! panic on a bad one), and the handshake, with its deadline and counters, and the client's
//! certificate when `tls.client_ca` asks for one ([`crate::client_cert`]).

use std::{collections::HashMap, path::Path, sync::Arc, time::Instant};

use arc_swap::ArcSwap;
use pingora::{
    listeners::tls::Acceptor,
    protocols::{
        ALPN, Peek, Ssl, Stream, l4::stream::Stream as L4Stream,
        tls::server::handshake_with_callback,
    },
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{
    TlsListener,
    acme::{Acme, ChallengeKind, challenges},
    client_cert::{ClientAuth, Identify},
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

/// The certificates the listener presents; a reload stores new ones, which the next
/// handshake uses.
pub type CertificateSlot = Arc<ArcSwap<Certificates>>;

/// The listener's certificates: the default pair, and more chosen by the name the client
/// asks for (SNI), each under the DNS names of its certificate.
#[derive(Debug)]
pub struct Certificates {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl Certificates {
    /// The default pair and `more` pairs, each read and checked; a name two certificates
    /// claim goes to the first that lists it.
    pub fn load(listener: &TlsListener) -> Result<Self, BuildError> {
        let mut set = Certificates {
            default: load_certified_key(&listener.cert, &listener.key)?,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (cert, key) in &listener.certificates {
            let pair = load_certified_key(cert, key)?;
            let names = pair
                .end_entity_cert()
                .ok()
                .and_then(dns_names)
                .ok_or_else(|| BuildError::NoDnsNames(cert.clone()))?;
            set.add(&pair, names);
        }
        // The default pair's own names too, after the others': an exact name of its beats
        // another certificate's wildcard, as nginx prefers exact names.
        let default = set.default.clone();
        if let Some(names) = default.end_entity_cert().ok().and_then(dns_names) {
            set.add(&default, names);
        }
        Ok(set)
    }

    /// `pair` under each of `names` not taken already.
    fn add(&mut self, pair: &Arc<CertifiedKey>, names: Vec<String>) {
        for name in names {
            let (map, name) = match name.strip_prefix("*.") {
                Some(parent) => (&mut self.wildcard, parent.to_owned()),
                None => (&mut self.exact, name),
            };
            map.entry(name).or_insert_with(|| pair.clone());
        }
    }

    /// The pair for `name` (the client's SNI, as [`sni_name`] gives it): its own, a
    /// wildcard's, or the default.
    pub fn for_name(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else {
            return self.default.clone();
        };
        if let Some(pair) = self.exact.get(name) {
            return pair.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }
}

/// The DNS names a certificate is for (its subjectAltName), in lower case; `None` if it
/// names none.
pub(crate) fn dns_names(der: &CertificateDer<'_>) -> Option<Vec<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    (!names.is_empty()).then_some(names)
}

/// The HTTPS listener's handshakes. They are made by [`crate::connection`], after the
/// connection is counted against the caps and under its own deadline: Pingora's listeners
/// would make them before either, allow each 60 s, and log every failure on its own line.
pub struct Handshake {
    acceptor: Acceptor,
    /// `Some` when clients are asked for a certificate: it reads theirs once the handshake
    /// is done. Without it, a handshake costs nothing more.
    identify: Option<Identify>,
    metrics: Option<Arc<Metrics>>,
}

/// The TLS record type of a handshake message (RFC 8446, 5.1).
const HANDSHAKE_RECORD: u8 = 0x16;

impl Handshake {
    /// TLS 1.2 and 1.3 with rustls's AEAD suites in the server's order of preference (Mozilla
    /// "intermediate"), the pair in `slot`, and HTTP/2 and HTTP/1.1 by ALPN.
    /// With `client_auth`, clients are asked for a certificate from its CAs.
    /// With `acme`, its certificates go before the slot's for their names, and TLS-ALPN-01
    /// handshakes get its challenge certificates.
    pub fn new(
        slot: CertificateSlot,
        client_auth: Option<&ClientAuth>,
        acme: Option<Arc<Acme>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, BuildError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(BuildError::TlsSettings)?;
        let builder = match client_auth {
            Some(auth) => builder.with_client_cert_verifier(auth.verifier(provider)?),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(CurrentCertificate {
            slot,
            acme: acme.clone(),
        }));
        // The strongest suite both sides have, rather than the client's first choice.
        config.ignore_client_order = true;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Last, so that no client offering HTTP gets it; an ACME server offers it alone.
        if acme.is_some_and(|a| a.challenge_kind() == ChallengeKind::TlsAlpn01) {
            config
                .alpn_protocols
                .push(challenges::TLS_ALPN_PROTOCOL.to_vec());
        }
        Ok(Self {
            acceptor: Acceptor::from_server_config(Arc::new(config)),
            identify: client_auth.map(|_| Identify),
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
            match &self.identify {
                Some(identify) => handshake_with_callback(&self.acceptor, *socket, identify).await,
                None => self.acceptor.tls_handshake(*socket).await,
            }
        };
        let outcome = tokio::time::timeout_at(deadline.into(), handshake).await;
        let failure = match outcome {
            Ok(Ok(tls)) => {
                if let Some(m) = metrics {
                    m.tls_handshakes.inc();
                }
                // A TLS-ALPN-01 check ends with the handshake (RFC 8737 3): no HTTP on it.
                if matches!(tls.selected_alpn_proto(), Some(ALPN::Custom(_))) {
                    return None;
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

struct CurrentCertificate {
    slot: CertificateSlot,
    acme: Option<Arc<Acme>>,
}

impl std::fmt::Debug for CurrentCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentCertificate").finish_non_exhaustive()
    }
}

/// The name a client asked for, as the certificates are kept under it: rustls hands it in lower
/// case, with the dot a fully qualified one may end in.
fn sni_name<'a>(hello: &'a ClientHello<'_>) -> Option<&'a str> {
    let name = hello.server_name()?;
    Some(name.strip_suffix('.').unwrap_or(name))
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = sni_name(&hello);
        if let Some(acme) = &self.acme {
            // A check offers acme-tls/1 alone (RFC 8737 3); it gets the challenge certificate
            // or no handshake, never a real one.
            let alpn_check = acme.challenge_kind() == ChallengeKind::TlsAlpn01
                && hello.alpn().is_some_and(|mut offered| {
                    offered.next() == Some(challenges::TLS_ALPN_PROTOCOL)
                        && offered.next().is_none()
                });
            if alpn_check {
                return acme.challenges.tls_alpn_certificate(name);
            }
            if let Some(pair) = acme.certificate(name) {
                return Some(pair);
            }
        }
        Some(self.slot.load().for_name(name))
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
        let listener = TlsListener {
            listen: "127.0.0.1:1".parse().unwrap(),
            cert,
            key,
            certificates: Vec::new(),
            client_auth: None,
        };
        let slot = Arc::new(ArcSwap::from_pointee(
            Certificates::load(&listener).unwrap(),
        ));
        let handshake = Handshake::new(slot, None, None, None).unwrap();
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
