//! Token claims signed with the real secret, so that what follows the signature check is
//! reached: the typed claims (`sub`, `role`, `iat`, `nbf`, `exp`, `jti`, `gen`), the validity
//! window with its leeway, an audience nobody asked for, another HMAC algorithm. Claims are
//! built field by field (each present or not, of the right type or not), or the payload is
//! raw bytes. Checked: no panic, and the verdict is the one the rules in `token.rs` give.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use gatehouse_backend::token::{self, LEEWAY_SECONDS, Tokens};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

#[derive(Arbitrary, Debug)]
enum Field {
    /// Seconds from now: the validity window's edges are near zero.
    Relative(i16),
    Number(u64),
    Negative(i64),
    Float(f64),
    Text(String),
    Role(u8),
    Null,
    Bool(bool),
    List(Vec<String>),
}

impl Field {
    fn json(&self, now: u64) -> Value {
        match self {
            Field::Relative(offset) => json!(now.saturating_add_signed(i64::from(*offset))),
            Field::Number(n) => json!(n),
            Field::Negative(n) => json!(n),
            Field::Float(f) => json!(f),
            Field::Text(text) => json!(text),
            Field::Role(r) => {
                json!(["admin", "maintainer", "viewer", "root", "Admin"][usize::from(r % 5)])
            }
            Field::Null => Value::Null,
            Field::Bool(b) => json!(b),
            Field::List(items) => json!(items),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Claims {
    sub: Option<Field>,
    role: Option<Field>,
    iat: Option<Field>,
    nbf: Option<Field>,
    exp: Option<Field>,
    jti: Option<Field>,
    generation: Option<Field>,
    aud: Option<Field>,
    iss: Option<Field>,
    algorithm: u8,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Claims(Claims),
    /// A payload that need not be JSON, or has duplicate keys, or deep nesting.
    Payload(Vec<u8>),
}

fuzz_target!(|input: Input| {
    let tokens = common::tokens();
    let key = EncodingKey::from_secret(common::SECRET);
    match input {
        Input::Claims(claims) => structured(&tokens, &key, &claims),
        Input::Payload(payload) => {
            let message = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(&payload)
            );
            let Ok(signature) =
                jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
            else {
                panic!("HS256 signs anything");
            };
            if let Ok(claims) = tokens.verify(&format!("{message}.{signature}")) {
                common::assert_in_window(&claims);
            }
        }
    }
});

fn structured(tokens: &Tokens, key: &EncodingKey, claims: &Claims) {
    let now = token::now();
    let mut map = Map::new();
    for (name, field) in [
        ("sub", &claims.sub),
        ("role", &claims.role),
        ("iat", &claims.iat),
        ("nbf", &claims.nbf),
        ("exp", &claims.exp),
        ("jti", &claims.jti),
        ("gen", &claims.generation),
        ("aud", &claims.aud),
        ("iss", &claims.iss),
    ] {
        if let Some(field) = field {
            map.insert(name.to_string(), field.json(now));
        }
    }
    let algorithm =
        [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512][usize::from(claims.algorithm % 3)];
    let value = Value::Object(map);
    let Ok(token) = jsonwebtoken::encode(&Header::new(algorithm), &value, key) else {
        panic!("HMAC signs any claims");
    };
    let verdict = tokens.verify(&token);

    let text = |name: &str| value.get(name).is_some_and(Value::is_string);
    let seconds = |name: &str| value.get(name).and_then(Value::as_u64);
    let role_ok = value
        .get("role")
        .and_then(Value::as_str)
        .is_some_and(|r| ["admin", "maintainer", "viewer"].contains(&r));
    // `aud` is refused when it is a string or a list of strings (no audience is expected);
    // anything else there is ignored.
    let aud_refused = match value.get("aud") {
        Some(Value::String(_)) => true,
        Some(Value::Array(items)) => items.iter().all(Value::is_string),
        _ => false,
    };
    let (Some(iat), Some(nbf), Some(exp)) = (seconds("iat"), seconds("nbf"), seconds("exp")) else {
        assert!(
            verdict.is_err(),
            "a time claim is missing or not seconds: {value}"
        );
        return;
    };
    let _ = iat;
    let well_typed = text("sub") && role_ok && text("jti") && text("gen");
    let expect = algorithm == Algorithm::HS256 && well_typed && !aud_refused;
    // Within two seconds of an edge, the clock decides; only the rest is checked.
    let earliest = now.saturating_sub(LEEWAY_SECONDS);
    let latest = now + LEEWAY_SECONDS;
    if exp.abs_diff(earliest) <= 2 || nbf.abs_diff(latest) <= 2 {
        return;
    }
    let in_window = exp >= earliest && nbf <= latest;
    match verdict {
        Ok(decoded) => {
            assert!(
                expect && in_window,
                "accepted {value} signed with {algorithm:?}"
            );
            assert_eq!((decoded.iat, decoded.nbf, decoded.exp), (iat, nbf, exp));
            assert_eq!(Some(decoded.sub.as_str()), value["sub"].as_str());
            assert_eq!(Some(decoded.jti.as_str()), value["jti"].as_str());
            assert_eq!(Some(decoded.generation.as_str()), value["gen"].as_str());
            assert_eq!(Some(decoded.role.as_str()), value["role"].as_str());
        }
        Err(error) => assert!(
            !(expect && in_window),
            "refused {value} signed with {algorithm:?}: {error}"
        ),
    }
}
