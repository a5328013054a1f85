//! Every token that must not count a visit gets 401 with `WWW-Authenticate: Bearer`.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::util::{Group, Options, SECRET};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(algorithm: Algorithm, secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token assembled by hand, for headers no library will write.
fn raw(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

/// `good` with `changes` applied: a `null` removes the claim.
fn altered(good: &Value, changes: Value) -> Value {
    let mut claims = good.clone();
    let object = claims.as_object_mut().unwrap();
    for (key, value) in changes.as_object().unwrap() {
        if value.is_null() {
            object.remove(key);
        } else {
            object.insert(key.clone(), value.clone());
        }
    }
    claims
}

#[test]
fn forged_expired_and_malformed_tokens_are_refused() {
    let group = Group::start(Options {
        backends: 2,
        ..Options::default()
    });
    // A token signed with the secret is accepted only when a login issued it (its `jti` is
    // live in Redis): the forgeries below start from a real one.
    let valid = group.token();
    let payload = valid.split('.').nth(1).unwrap();
    let good: Value = serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
    assert_eq!(group.count(&valid).status(), 200, "the issued token");
    assert_eq!(
        group.count(&sign(Algorithm::HS256, SECRET, &good)).status(),
        200,
        "the same claims signed again with the secret"
    );

    let tampered = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
        parts[1] = B64.encode(altered(&good, json!({"sub": "root"})).to_string());
        parts.join(".")
    };
    let forged = |changes: Value| sign(Algorithm::HS256, SECRET, &altered(&good, changes));
    let attacks: Vec<(&str, String)> = vec![
        (
            "bad signature",
            sign(
                Algorithm::HS256,
                "another-secret-of-enough-length-0123456789",
                &good,
            ),
        ),
        ("tampered claims", tampered),
        (
            "alg none",
            raw(&json!({"alg": "none", "typ": "JWT"}), &good, ""),
        ),
        (
            "alg NONE with signature",
            raw(&json!({"alg": "NONE"}), &good, "c2ln"),
        ),
        ("another algorithm", sign(Algorithm::HS512, SECRET, &good)),
        (
            "expired",
            forged(json!({"iat": now() - 7200, "nbf": now() - 7200, "exp": now() - 3600})),
        ),
        (
            "exp as a string",
            forged(json!({"exp": (now() + 600).to_string()})),
        ),
        ("nbf as a string", forged(json!({"nbf": now().to_string()}))),
        (
            "not yet valid",
            forged(json!({"exp": now() + 7200, "nbf": now() + 3600})),
        ),
        ("no exp", forged(json!({"exp": null}))),
        ("no nbf", forged(json!({"nbf": null}))),
        ("no iat", forged(json!({"iat": null}))),
        ("no sub", forged(json!({"sub": null}))),
        ("no jti", forged(json!({"jti": null}))),
        ("no gen", forged(json!({"gen": null}))),
        ("another gen", forged(json!({"gen": "another generation"}))),
        ("a jti no login issued", forged(json!({"jti": "j1"}))),
        ("no role", forged(json!({"role": null}))),
        ("a role we do not know", forged(json!({"role": "root"}))),
        ("a user we do not know", forged(json!({"sub": "nobody"}))),
        ("garbage", "garbage".to_string()),
        ("three dots of garbage", "a.b.c".to_string()),
        ("empty", String::new()),
    ];
    for (name, token) in &attacks {
        let response = group.count(token);
        assert_eq!(response.status(), 401, "{name}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{name}");
        let body: Value = response.json().unwrap();
        assert_eq!(body["error"], "invalid_token", "{name}: {body}");
    }

    // No header, another scheme, a bare token.
    let no_header = group.get("/api/count").unwrap();
    assert_eq!(no_header.status(), 401);
    assert_eq!(no_header.headers()["www-authenticate"], "Bearer");
    for value in [
        format!("Basic {valid}"),
        valid.clone(),
        "Bearer".to_string(),
    ] {
        let response = group
            .client
            .get(group.url("/api/count"))
            .header("authorization", value)
            .send()
            .unwrap();
        assert_eq!(response.status(), 401);
    }

    // Nothing above was counted: the two good requests made the count 2.
    let response = group.count(&valid);
    assert_eq!(response.json::<Value>().unwrap()["visits"], 3);
}
