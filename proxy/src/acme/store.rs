//! The account and the certificates on disk, so that a restart serves what it had and orders
//! nothing it does not need. Under `storage`, one directory per ACME server (named for its
//! directory URL: a staging certificate is never served by a production setup):
//!
//! - `account.json`: the account's key and URL;
//! - `NAME.pem`: a certificate chain with its private key after it, one file so that a crash
//!   between two writes cannot pair a new chain with an old key.
//!
//! Every file is written whole to a temporary name and renamed over the old one, with mode
//! 0600 from its creation.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

/// A certificate read back from the store, or just issued.
pub struct Stored {
    pub pair: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Stored {
    /// Whether the certificate names `name` (a DNS name of its subjectAltName).
    pub fn is_for(&self, name: &str) -> bool {
        let names = self
            .pair
            .end_entity_cert()
            .ok()
            .and_then(crate::tls::dns_names);
        names.is_some_and(|names| names.iter().any(|n| n == name))
    }
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store for the ACME server at `directory_url`, under `storage`; made (0700) if absent.
    pub fn open(storage: &Path, directory_url: &str) -> io::Result<Self> {
        let dir = storage.join(dir_name(directory_url));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Self { dir })
    }

    pub fn account(&self) -> Option<Vec<u8>> {
        fs::read(self.dir.join("account.json")).ok()
    }

    pub fn remove_account(&self) {
        let _ = fs::remove_file(self.dir.join("account.json"));
    }

    pub fn save_account(&self, json: &[u8]) -> io::Result<()> {
        write_private(&self.dir.join("account.json"), json)
    }

    /// The stored certificate for `name`, if it reads back whole, its key matches and it
    /// names `name`; anything else is as if absent (a new one is ordered).
    pub fn certificate(&self, name: &str) -> Option<Stored> {
        let pem = fs::read(self.cert_path(name)).ok()?;
        parse(&pem).ok().filter(|stored| stored.is_for(name))
    }

    /// `pem`: the chain, then its key, as [`whole`] joins them.
    pub fn save_certificate(&self, name: &str, pem: &[u8]) -> io::Result<()> {
        write_private(&self.cert_path(name), pem)
    }

    /// When `name` may be ordered again after failures, and how many there were: kept so that
    /// a restart (or a crash loop) keeps to the backoff, and so to the CA's rate limits.
    pub fn retry(&self, name: &str) -> Option<(SystemTime, u32)> {
        let text = fs::read_to_string(self.dir.join(format!("{name}.retry"))).ok()?;
        let (at, failures) = text.trim().split_once(' ')?;
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at.parse().ok()?);
        Some((at, failures.parse().ok()?))
    }

    pub fn save_retry(&self, name: &str, at: SystemTime, failures: u32) -> io::Result<()> {
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let path = self.dir.join(format!("{name}.retry"));
        write_private(&path, format!("{secs} {failures}\n").as_bytes())
    }

    pub fn clear_retry(&self, name: &str) {
        let _ = fs::remove_file(self.dir.join(format!("{name}.retry")));
    }

    fn cert_path(&self, name: &str) -> PathBuf {
        // Names are checked host names by now (letters, digits, '-', '.'), never a path.
        self.dir.join(format!("{name}.pem"))
    }
}

/// A chain and its key in one PEM text, as stored.
pub fn whole(chain_pem: &str, key_pem: &str) -> String {
    format!("{}\n{key_pem}", chain_pem.trim_end())
}

/// A chain followed by its key, as [`Store::save_certificate`] writes it, checked: the key
/// must match the first certificate.
pub fn parse(pem: &[u8]) -> Result<Stored, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let leaf = certs.first().ok_or("no certificate")?;
    let (not_before, not_after) = validity(leaf).ok_or("unreadable validity dates")?;
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("unreadable key: {e}"))?;
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable key: {e}"))?;
    let pair = CertifiedKey::new(certs, signing_key);
    pair.keys_match()
        .map_err(|e| format!("the key does not match the certificate: {e}"))?;
    Ok(Stored {
        pair: Arc::new(pair),
        not_before,
        not_after,
    })
}

fn validity(der: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let at = |t: i64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?));
    let validity = cert.validity();
    Some((
        at(validity.not_before.timestamp())?,
        at(validity.not_after.timestamp())?,
    ))
}

/// `https://acme-v02.api.letsencrypt.org/directory` to
/// `acme-v02.api.letsencrypt.org-directory`.
pub(super) fn dir_name(directory_url: &str) -> String {
    let rest = directory_url
        .split_once("://")
        .map_or(directory_url, |(_, rest)| rest);
    rest.trim_end_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A name of its own per write, so two processes (an upgrade's old and new proxy) never
/// write into one temporary file.
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.new", uuid::Uuid::new_v4().simple()));
    let temporary = PathBuf::from(temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&temporary, path));
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn each_acme_server_has_its_own_directory() {
        assert_eq!(
            dir_name("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org-directory"
        );
        assert_eq!(
            dir_name("https://127.0.0.1:14000/dir"),
            "127.0.0.1-14000-dir"
        );
    }

    #[test]
    fn a_retry_time_outlives_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "https://ca.test/dir").unwrap();
        assert!(store.retry("a.test").is_none());
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        store.save_retry("a.test", at, 3).unwrap();
        let reopened = Store::open(dir.path(), "https://ca.test/dir").unwrap();
        assert_eq!(reopened.retry("a.test"), Some((at, 3)));
        reopened.clear_retry("a.test");
        assert!(store.retry("a.test").is_none());
    }

    #[test]
    fn a_saved_certificate_reads_back_and_is_private() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "https://ca.test/dir").unwrap();
        let pem = whole(&cert.pem(), &key.serialize_pem());
        store.save_certificate("a.test", pem.as_bytes()).unwrap();
        let stored = store.certificate("a.test").expect("reads back");
        assert!(stored.not_after > SystemTime::now());
        assert!(store.certificate("b.test").is_none());
        let mode = fs::metadata(store.cert_path("a.test"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A key of another certificate is refused, not served.
        let other = rcgen::KeyPair::generate().unwrap();
        let pem = whole(&cert.pem(), &other.serialize_pem());
        store.save_certificate("a.test", pem.as_bytes()).unwrap();
        assert!(store.certificate("a.test").is_none());
    }
}
