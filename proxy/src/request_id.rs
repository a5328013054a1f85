//! Request ids: kept from the client when well formed, otherwise made here.

/// Accepts ids of 1-128 visible characters drawn from a safe set, so an id can be copied
/// into headers, JSON and log lines without escaping.
pub fn accept(value: &[u8]) -> Option<&str> {
    let ok = (1..=128).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b));
    if ok {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

pub fn generate() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_ids_only() {
        assert_eq!(accept(b"abc-123"), Some("abc-123"));
        assert!(accept(b"").is_none());
        assert!(accept(b"a b").is_none());
        assert!(accept(b"x\"}").is_none());
        assert!(accept(&[b'a'; 129]).is_none());
        assert_eq!(generate().len(), 36);
    }
}
