//! Redis outages: counting pauses with 503 and resumes from the stored value.

use std::time::Duration;

use serde_json::Value;

use crate::util::{Group, Options, group_with_own_redis, wait_until};

#[test]
fn redis_down_gives_503_and_counting_resumes_when_it_returns() {
    let (_data, mut redis, group) = group_with_own_redis(2);
    let token = group.token();
    for expected in 1..=3 {
        let response = group.count(&token);
        assert_eq!(response.status(), 200);
        assert_eq!(response.json::<Value>().unwrap()["visits"], expected);
    }

    redis.stop();
    for _ in 0..4 {
        let response = group.count(&token);
        assert_eq!(
            response.status(),
            503,
            "never a made-up count while Redis is down"
        );
        assert_eq!(response.headers()["retry-after"], "1");
        let body: Value = response.json().unwrap();
        assert_eq!(body["error"], "store_unavailable", "{body}");
    }
    // The backends stay up and healthy while Redis is down.
    assert_eq!(group.get("/api/ping").unwrap().status(), 200);

    redis.restart();
    let mut visits = Value::Null;
    let resumed = wait_until(Duration::from_secs(15), || {
        let response = group.count(&token);
        if response.status() != 200 {
            return false;
        }
        visits = response.json::<Value>().unwrap()["visits"].clone();
        true
    });
    assert!(
        resumed,
        "counting did not resume after Redis came back:\n{}",
        group.log()
    );
    assert_eq!(visits, 4, "the count resumes from the persisted value");
}

#[test]
fn backends_start_while_redis_is_down() {
    // A Redis URL nobody listens on: the group still starts; logging in and counting say 503
    // (users, the denylist and the count all live in Redis).
    let port = crate::util::free_port();
    let group = Group::start(Options {
        backends: 1,
        redis_url: Some(format!("redis://127.0.0.1:{port}")),
        ..Options::default()
    });
    let response = group.login(crate::util::USER, crate::util::PASSWORD);
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.json::<Value>().unwrap()["error"],
        "store_unavailable"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "sub": "admin", "role": "admin", "iat": now, "nbf": now, "exp": now + 60, "jti": "j",
        "gen": "g"
    });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(crate::util::SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(group.count(&token).status(), 503);
    let health: Value = group
        .client
        .get(group.url("/api/ping"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["status"], "ok");
}
