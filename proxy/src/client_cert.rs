//! Client certificates (mTLS). The HTTPS listener asks for them when `tls.client_ca` is set
//! (nginx: `ssl_verify_client on|optional`); rustls checks each against that CA bundle in the
//! handshake, so a certificate from another CA, or an expired one, never gets a connection.
//! What a verified certificate says is read once per connection, at the handshake
//! ([`Identify`]), and each request to an upstream carries it in headers only the edge writes
//! ([`forward`]): the client's own are removed first on every route, certificate or not,
//! since a backend trusts them.
//!
//! `[[tls.client_users]]` maps a certificate to a user of the API ([`ClientUsers`]): the
//! backends take `X-Gatehouse-Cert-User` as that user's sign-in when the request carries no
//! token or key of its own.

use std::{any::Any, fmt, net::IpAddr, sync::Arc};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use pingora::{listeners::TlsAccept, protocols::tls::TlsRef};
use rustls::{
    RootCertStore,
    crypto::CryptoProvider,
    pki_types::CertificateDer,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use sha2::Digest;
use x509_parser::{extensions::GeneralName, x509::X509Name};

use crate::{error::BuildError, header_rules::HeaderEdit};

/// The certificate's subject, as an RFC 4514 string (`CN=billing,O=Example`).
pub static X_CLIENT_CERT_SUBJECT: HeaderName = HeaderName::from_static("x-client-cert-subject");
/// Its subjectAltNames: `DNS:a.example, URI:spiffe://example.org/billing, email:a@example,
/// IP:10.0.0.1`.
pub static X_CLIENT_CERT_SAN: HeaderName = HeaderName::from_static("x-client-cert-san");
/// The SHA-256 of the certificate (DER), in lower-case hex.
pub static X_CLIENT_CERT_FINGERPRINT: HeaderName =
    HeaderName::from_static("x-client-cert-fingerprint");
/// The API user `[[tls.client_users]]` maps the certificate to.
pub static X_GATEHOUSE_CERT_USER: HeaderName = HeaderName::from_static("x-gatehouse-cert-user");

/// A subject longer than this, as written in its header, is not passed on: a certificate
/// that says more than a header should carry is taken as no certificate (see
/// [`ClientCert::read`]), rather than passed on cut short.
pub const MAX_SUBJECT_BYTES: usize = 1024;
/// The same for the subjectAltNames, as written in theirs.
pub const MAX_SAN_BYTES: usize = 4096;

/// The HTTPS listener's client certificates (`tls.client_ca`, `tls.client_certs`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// The CA certificates (DER) a client's certificate must chain to.
    pub ca: Vec<Vec<u8>>,
    /// `false`: a client without a certificate gets a connection too, and routes that
    /// require one answer it `403`.
    pub required: bool,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("ca", &self.bundle())
            .field("required", &self.required)
            .finish()
    }
}

impl ClientAuth {
    /// The bundle as [`crate::live::Fixed`] compares it: by its contents, so that an edited
    /// file is named as waiting for a restart.
    pub fn bundle(&self) -> String {
        let mut digest = sha2::Sha256::new();
        for der in &self.ca {
            digest.update(der);
        }
        format!(
            "{} certificates, sha256 {}",
            self.ca.len(),
            hex(&digest.finalize())
        )
    }

    /// rustls's WebPKI verifier over the bundle: the chain, the dates, the client-auth key
    /// usage, the signatures.
    pub fn verifier(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ClientCertVerifier>, BuildError> {
        let mut roots = RootCertStore::empty();
        for der in &self.ca {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| BuildError::ClientCa(e.to_string()))?;
        }
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let builder = if self.required {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        builder
            .build()
            .map_err(|e| BuildError::ClientCa(e.to_string()))
    }
}

/// What `[[tls.client_users]]` may name a certificate by, most specific first: a certificate
/// whose names map to several users goes to the first kind here that maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Fingerprint,
    Uri,
    Dns,
    Email,
    /// The subject's common name.
    Cn,
}

const KINDS: usize = 5;

/// A verified client certificate, as the upstreams are told of it. Made once per
/// connection, at the handshake.
#[derive(Debug)]
pub struct ClientCert {
    subject: Option<HeaderValue>,
    san: Option<HeaderValue>,
    fingerprint: HeaderValue,
    /// Its names by kind, in [`Kind`]'s order, DNS names in lower case.
    names: Vec<(Kind, String)>,
}

impl ClientCert {
    /// Reads a certificate the handshake verified; `Err` says why it cannot be passed on.
    pub fn read(der: &[u8]) -> Result<ClientCert, String> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable: {e}"))?;
        let fingerprint = hex(&sha2::Sha256::digest(der));
        let mut names = vec![(Kind::Fingerprint, fingerprint.clone())];
        let subject = rfc4514(cert.subject());
        if subject.len() > MAX_SUBJECT_BYTES {
            return Err(format!(
                "its subject is over {MAX_SUBJECT_BYTES} bytes ({})",
                subject.len()
            ));
        }
        let mut san = String::new();
        let alt_names = cert
            .subject_alternative_name()
            .map_err(|e| format!("its subjectAltName: {e}"))?;
        for name in alt_names.iter().flat_map(|ext| &ext.value.general_names) {
            let (label, kind, value) = match name {
                GeneralName::DNSName(dns) => ("DNS", Some(Kind::Dns), dns.to_ascii_lowercase()),
                GeneralName::URI(uri) => ("URI", Some(Kind::Uri), (*uri).to_owned()),
                GeneralName::RFC822Name(email) => ("email", Some(Kind::Email), (*email).to_owned()),
                GeneralName::IPAddress(bytes) => match ip(bytes) {
                    Some(address) => ("IP", None, address.to_string()),
                    None => continue,
                },
                _ => continue,
            };
            if !san.is_empty() {
                san.push_str(", ");
            }
            san.push_str(label);
            san.push(':');
            san_value(&mut san, &value);
            if san.len() > MAX_SAN_BYTES {
                return Err(format!(
                    "its subjectAltNames are over {MAX_SAN_BYTES} bytes"
                ));
            }
            if let Some(kind) = kind {
                names.push((kind, value));
            }
        }
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push((Kind::Cn, cn.to_owned()));
            }
        }
        // Stable: a kind's names keep the certificate's order.
        names.sort_by_key(|(kind, _)| *kind);
        let header = |text: String| {
            HeaderValue::try_from(text).map_err(|_| "a name cannot be a header".to_string())
        };
        Ok(ClientCert {
            subject: (!subject.is_empty()).then(|| header(subject)).transpose()?,
            san: (!san.is_empty()).then(|| header(san)).transpose()?,
            fingerprint: header(fingerprint)?,
            names,
        })
    }

    /// The connection's verified certificate, if it had one: what [`Identify`] left in its
    /// TLS digest.
    pub fn of(digest: &pingora::protocols::tls::SslDigest) -> Option<&ClientCert> {
        digest.extension.get::<ClientCert>()
    }
}

/// Reads the client's certificate when a handshake completes, once per connection; requests
/// find it in the connection's TLS digest ([`ClientCert::of`]).
pub struct Identify;

#[async_trait]
impl TlsAccept for Identify {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let der = tls.peer_certificate_der()?;
        match ClientCert::read(der) {
            Ok(cert) => Some(Arc::new(cert)),
            Err(why) => {
                // Only certificates the CA signed get here: worth the operator's notice.
                tracing::warn!(%why, "a verified client certificate is not passed on; the connection is served as one without");
                None
            }
        }
    }
}

/// `[[tls.client_users]]`: certificate names mapped to users of the API.
#[derive(Debug, Clone, Default)]
pub struct ClientUsers {
    /// One map per [`Kind`].
    by_kind: [std::collections::HashMap<String, HeaderValue>; KINDS],
}

impl ClientUsers {
    /// Maps certificates named `name` (as [`ClientCert`] keeps it: a fingerprint in
    /// lower-case hex without colons, a DNS name in lower case) to `user`. `Err`: the name is
    /// mapped already, or `user` is no user name.
    pub fn insert(&mut self, kind: Kind, name: String, user: &str) -> Result<(), String> {
        if !is_user_name(user) {
            return Err(format!(
                "{user:?} is not a user name (a letter or digit, then up to 63 letters, \
                 digits, `.`, `_` or `-`)"
            ));
        }
        let value = HeaderValue::from_str(user).map_err(|e| e.to_string())?;
        let map = &mut self.by_kind[kind as usize];
        if map.contains_key(&name) {
            return Err(format!("{name:?} is mapped twice"));
        }
        map.insert(name, value);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.by_kind.iter().all(|map| map.is_empty())
    }

    /// The user `cert` stands for: its most specific name that is mapped.
    pub fn user(&self, cert: &ClientCert) -> Option<&HeaderValue> {
        if self.is_empty() {
            return None;
        }
        cert.names
            .iter()
            .find_map(|(kind, name)| self.by_kind[*kind as usize].get(name))
    }
}

/// A user name as the API's accounts have them.
pub fn is_user_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=64).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The headers the edge sets from a certificate.
const HEADERS: [&HeaderName; 4] = [
    &X_CLIENT_CERT_SUBJECT,
    &X_CLIENT_CERT_SAN,
    &X_CLIENT_CERT_FINGERPRINT,
    &X_GATEHOUSE_CERT_USER,
];

/// The identity headers toward an upstream: the client's removed, always; then, for a
/// connection with a verified certificate, the edge's.
pub fn forward(
    upstream: &mut impl HeaderEdit,
    cert: Option<&ClientCert>,
    users: &ClientUsers,
) -> pingora::Result<()> {
    for name in HEADERS {
        upstream.drop_all(name);
    }
    // CGI and WSGI read `_` as `-`: a client's `X_Gatehouse_Cert_User` would reach an
    // application behind them as the edge's header (nginx drops such names by default).
    let spelled_apart: Vec<HeaderName> = upstream
        .map()
        .keys()
        .filter(|name| name.as_str().contains('_') && is_ours_with_underscores(name))
        .cloned()
        .collect();
    for name in &spelled_apart {
        upstream.drop_all(name);
    }
    let Some(cert) = cert else {
        return Ok(());
    };
    if let Some(subject) = &cert.subject {
        upstream.put(&X_CLIENT_CERT_SUBJECT, subject.clone())?;
    }
    if let Some(san) = &cert.san {
        upstream.put(&X_CLIENT_CERT_SAN, san.clone())?;
    }
    upstream.put(&X_CLIENT_CERT_FINGERPRINT, cert.fingerprint.clone())?;
    if let Some(user) = users.user(cert) {
        upstream.put(&X_GATEHOUSE_CERT_USER, user.clone())?;
    }
    Ok(())
}

fn is_ours_with_underscores(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    HEADERS.iter().any(|ours| {
        let ours = ours.as_str().as_bytes();
        ours.len() == name.len()
            && ours
                .iter()
                .zip(name)
                .all(|(o, n)| o == n || (*o == b'-' && *n == b'_'))
    })
}

/// A fingerprint as `[[tls.client_users]]` may write it (`AB:CD:...`, as `openssl x509
/// -fingerprint -sha256` prints it, or plain hex), as [`ClientCert`] keeps it.
pub fn fingerprint(text: &str) -> Option<String> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// A SAN's value in the list: `,` separates entries and `%` escapes, so both (and anything
/// but visible ASCII) are percent-encoded.
fn san_value(out: &mut String, value: &str) {
    use std::fmt::Write;
    for b in value.bytes() {
        if b.is_ascii_graphic() && b != b',' && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// A name as RFC 4514 writes it: the last RDN first, `,` between RDNs and `+` within one,
/// the usual short names (others as their OID, with the value's DER in hex). Every byte
/// outside printable ASCII is escaped as `\XX`, so the string is a header value as it is.
fn rfc4514(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attribute) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = attribute.attr_type().to_id_string();
            let short = short_name(&oid);
            match (short, attribute.as_str()) {
                (Some(short), Ok(value)) => {
                    out.push_str(short);
                    out.push('=');
                    escape_value(&mut out, value);
                }
                _ => {
                    out.push_str(&oid);
                    out.push_str("=#");
                    let value = attribute.attr_value();
                    let data = value.data;
                    let tag = value.tag().0;
                    // A universal tag below 31 fits one byte; the class bits are zero.
                    out.push_str(&hex(&[u8::try_from(tag).unwrap_or(0x04)]));
                    out.push_str(&hex(&der_length(data.len())));
                    out.push_str(&hex(data));
                }
            }
        }
    }
    out
}

fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

/// RFC 4514 2.3's short names.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.6" => "C",
        "2.5.4.9" => "STREET",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        _ => return None,
    })
}

/// RFC 4514 2.4: the special characters escaped with `\`, a leading `#` or space and a
/// trailing space too; anything outside printable ASCII as `\XX` per UTF-8 byte.
fn escape_value(out: &mut String, value: &str) {
    use std::fmt::Write;
    let last = value.len().saturating_sub(1);
    for (i, b) in value.bytes().enumerate() {
        let special = matches!(b, b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\')
            || (i == 0 && (b == b'#' || b == b' '))
            || (i == last && b == b' ');
        if special {
            out.push('\\');
            out.push(b as char);
        } else if b.is_ascii_graphic() || b == b' ' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(params: rcgen::CertificateParams) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn named(sans: Vec<rcgen::SanType>, dn: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in dn {
            params.distinguished_name.push(kind.clone(), *value);
        }
        cert(params)
    }

    #[test]
    fn the_subject_is_written_as_rfc_4514_says() {
        let der = named(
            Vec::new(),
            &[
                (rcgen::DnType::CountryName, "NL"),
                (rcgen::DnType::OrganizationName, "Ex, Ample+Co"),
                (rcgen::DnType::CommonName, " #billing é "),
            ],
        );
        let cert = ClientCert::read(&der).unwrap();
        assert_eq!(
            cert.subject.unwrap(),
            r"CN=\ #billing \C3\A9\ ,O=Ex\, Ample\+Co,C=NL"
        );
    }

    #[test]
    fn alt_names_are_listed_typed_and_escaped() {
        use rcgen::SanType;
        let der = named(
            vec![
                SanType::DnsName("Svc.Example".try_into().unwrap()),
                SanType::URI("spiffe://example.org/a,b%".try_into().unwrap()),
                SanType::Rfc822Name("ops@example.com".try_into().unwrap()),
                SanType::IpAddress("10.0.0.1".parse().unwrap()),
            ],
            &[(rcgen::DnType::CommonName, "svc")],
        );
        let cert = ClientCert::read(&der).unwrap();
        assert_eq!(
            cert.san.as_ref().unwrap(),
            "DNS:svc.example, URI:spiffe://example.org/a%2Cb%25, email:ops@example.com, IP:10.0.0.1"
        );
        assert_eq!(cert.fingerprint.len(), 64);
        let mut users = ClientUsers::default();
        users.insert(Kind::Cn, "svc".into(), "by-cn").unwrap();
        assert_eq!(users.user(&cert).unwrap(), "by-cn");
        users
            .insert(Kind::Dns, "svc.example".into(), "by-dns")
            .unwrap();
        assert_eq!(users.user(&cert).unwrap(), "by-dns");
        users
            .insert(Kind::Uri, "spiffe://example.org/a,b%".into(), "by-uri")
            .unwrap();
        assert_eq!(users.user(&cert).unwrap(), "by-uri");
        let print = cert.fingerprint.to_str().unwrap().to_owned();
        users.insert(Kind::Fingerprint, print, "by-print").unwrap();
        assert_eq!(users.user(&cert).unwrap(), "by-print");
    }

    #[test]
    fn too_many_names_are_not_cut_short_but_refused() {
        let sans = (0..400)
            .map(|i| rcgen::SanType::DnsName(format!("host-{i}.example.com").try_into().unwrap()))
            .collect();
        let der = named(sans, &[]);
        assert!(ClientCert::read(&der).unwrap_err().contains("4096"));
    }

    #[test]
    fn the_clients_are_removed_in_any_spelling() {
        let mut headers = pingora::http::RequestHeader::build("GET", b"/", None).unwrap();
        for name in [
            "X-Gatehouse-Cert-User",
            "x_gatehouse_cert_user",
            "X-Client_Cert-Subject",
            "x-client-cert-san",
            "X-Client-Cert-Fingerprint",
            "x_other",
        ] {
            headers.append_header(name.to_owned(), "admin").unwrap();
        }
        forward(&mut headers, None, &ClientUsers::default()).unwrap();
        let left: Vec<&str> = headers.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x_other"]);
    }

    #[test]
    fn no_header_rule_may_set_or_remove_them() {
        use crate::header_rules::{Direction, name};
        for header in [
            &X_CLIENT_CERT_SUBJECT,
            &X_CLIENT_CERT_SAN,
            &X_CLIENT_CERT_FINGERPRINT,
            &X_GATEHOUSE_CERT_USER,
        ] {
            assert!(
                name(Direction::Request, header.as_str()).is_err(),
                "{header}"
            );
        }
    }

    #[test]
    fn user_names_and_fingerprints_are_checked() {
        for good in ["admin", "svc.billing-1_a", &"a".repeat(64)] {
            assert!(is_user_name(good), "{good}");
        }
        for bad in ["", "-a", ".a", "a b", "a\n", "é", &"a".repeat(65)] {
            assert!(!is_user_name(bad), "{bad:?}");
        }
        let colons = "AB:".repeat(31) + "AB";
        assert_eq!(fingerprint(&colons), Some("ab".repeat(32)));
        assert_eq!(fingerprint("abc"), None);
        let mut users = ClientUsers::default();
        users.insert(Kind::Cn, "x".into(), "a").unwrap();
        assert!(users.insert(Kind::Cn, "x".into(), "b").is_err());
        assert!(users.insert(Kind::Dns, "x".into(), "bad name").is_err());
    }
}
