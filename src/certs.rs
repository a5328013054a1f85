//! TLS certificates: a self-signed one for development (`gatehouse cert`, or `gatehouse run`
//! when none is configured), and the start-up check that a configured pair is usable.
//! Pingora loads the files only when its listener starts, and panics there on a bad pair;
//! this check turns that into an error naming the file.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use crate::{Error, Result};

/// Self-signed ECDSA P-256, valid for 365 days, for localhost and `names`.
pub fn generate(cert_path: &Path, key_path: &Path, names: &[String]) -> Result<()> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    sans.extend(
        names
            .iter()
            .filter(|n| !sans.contains(n))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let mut params = rcgen::CertificateParams::new(sans)
        .map_err(|e| Error::Runtime(format!("certificate names: {e}")))?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(365);
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().map_or("localhost", String::as_str),
    );
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Runtime(format!("cannot make a key: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::Runtime(format!("cannot sign the certificate: {e}")))?;
    for path in [cert_path, key_path] {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        }
    }
    write(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write(cert_path, cert.pem().as_bytes(), 0o644)
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(Error::io(format!("cannot write {}", path.display())))?;
    // `mode` applies only to a new file; an overwritten key must not keep looser permissions.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!(
            "cannot set permissions of {}",
            path.display()
        )))?;
    file.write_all(contents)
        .map_err(Error::io(format!("cannot write {}", path.display())))
}

/// Reads both files and checks that the key belongs to the certificate.
pub fn validate(cert_path: &Path, key_path: &Path) -> Result<()> {
    gatehouse_proxy::tls::load_certified_key(cert_path, key_path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pairs_validate_and_mismatches_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a_cert, a_key) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        let (b_cert, b_key) = (dir.path().join("b.crt"), dir.path().join("b.key"));
        generate(&a_cert, &a_key, &["edge.example".into()]).unwrap();
        generate(&b_cert, &b_key, &[]).unwrap();
        validate(&a_cert, &a_key).unwrap();
        let err = validate(&a_cert, &b_key).unwrap_err().to_string();
        assert!(err.contains("b.key does not match"), "{err}");
        let err = validate(&dir.path().join("none.crt"), &a_key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("none.crt"), "{err}");
        let err = validate(&a_key, &a_key).unwrap_err().to_string();
        assert!(
            err.contains("a.key: no certificate") || err.contains("a.key"),
            "{err}"
        );
    }
}
