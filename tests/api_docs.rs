//! The API's own documentation through the proxy: the OpenAPI document holds under
//! schemathesis, and Swagger UI loads it and calls the API in a real browser.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    browser::{Browser, chromium},
    util::{Group, Options, USER, expect},
};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The schemathesis executable: `GATEHOUSE_SCHEMATHESIS`, the one `scripts/ensure-deps.sh
/// --tests` installs, or one on the `PATH`.
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("GATEHOUSE_SCHEMATHESIS") {
        return path.into();
    }
    let installed = repo().join("target/tools/schemathesis/bin/schemathesis");
    if installed.exists() {
        return installed;
    }
    let on_path = Command::new("schemathesis").arg("--version").output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return "schemathesis".into();
    }
    panic!(
        "schemathesis is not installed: run `scripts/ensure-deps.sh --tests` (a virtualenv in \
         target/tools/schemathesis), or `pip install 'schemathesis>=4,<5'`, or set \
         GATEHOUSE_SCHEMATHESIS to its executable"
    );
}

#[test]
fn the_api_keeps_to_its_openapi_document_under_schemathesis() {
    let schemathesis = schemathesis();
    let group = Group::start(Options {
        backends: 2,
        // Its made-up API keys are charged to the login guard like wrong passwords; past the
        // limit they would be answered 429, not the 401 it checks for. The guard has its own
        // tests (accounts.rs, identity.rs).
        backend_extra: "login_max_failures_per_ip = 100000\n\
                        login_max_failures_per_user_per_ip = 100000\n\
                        login_max_failures_per_user_all_ips = 100000\n"
            .into(),
        ..Options::default()
    });
    let runner = group.token();
    let to_log_out = group.token();
    let certificate = group.dir.path().join("certs/gatehouse.crt");
    // Everything but logout with one admin token; logout on its own with another, since its
    // success revokes the token it runs with.
    let runs = [
        (&runner, ["--exclude-path", "/auth/logout"], 300),
        (&to_log_out, ["--include-path", "/auth/logout"], 5),
    ];
    for (token, filter, at_least) in runs {
        let output = Command::new(&schemathesis)
            .arg("run")
            .arg(group.url("/api/openapi.json"))
            .args(["--checks", "all", "--max-examples", "40", "--no-color"])
            // The hook sends requests that name the runner to a user that does not exist;
            // when the stateful phase links such a request to a user it just created, this
            // check reads the hook's 404 as the API losing that user (seen as a rare,
            // seed-dependent failure).
            .args(["--exclude-checks", "ensure_resource_availability"])
            .arg("--tls-verify")
            .arg(&certificate)
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args(filter)
            .env(
                "SCHEMATHESIS_HOOKS",
                repo().join("tests/schemathesis_hooks.py"),
            )
            .env("GATEHOUSE_SCHEMATHESIS_USER", USER)
            // Its reports and example database go to the test's directory.
            .current_dir(group.dir.path())
            .output()
            .expect("run schemathesis");
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "schemathesis {filter:?}:\n{text}");
        assert!(text.contains("No issues found"), "{text}");
        let generated: u64 = text
            .split_once(" generated, ")
            .and_then(|(before, _)| before.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no test case count in:\n{text}"));
        assert!(generated >= at_least, "only {generated} cases:\n{text}");
        println!("schemathesis {filter:?}: {generated} test cases, no issues");
    }
    // The runner's token lived through the whole run, so protected operations were tried for
    // real, not only refused.
    expect(
        group.call(Method::GET, "/api/me", &runner, None),
        200,
        "runner",
    );
    assert!(!group.log().contains("panicked"), "{}", group.log());
}

#[test]
fn swagger_ui_and_its_assets_load_through_the_proxy() {
    // The same site and API again under /flask/, the prefix removed on the way to the
    // backends, as the deployment gatehouse replaces served them.
    let swagger = repo().join("static/swagger");
    let group = Group::start(Options {
        backends: 1,
        extra: format!(
            "[[routes]]\nprefix = \"/flask/\"\nupstream = \"backends\"\nrewrite_prefix = \"/\"\n\
             [[routes]]\nprefix = \"/flask/swagger/\"\nstatic_dir = {:?}\n",
            swagger.display().to_string()
        ),
        ..Options::default()
    });
    let page = group.get("/swagger/").unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().unwrap();
    for script in ["swagger-ui-bundle.js", "swagger-initializer.js"] {
        assert!(
            html.contains(&format!(r#"<script src="{script}">"#)),
            "{html}"
        );
    }
    // No CDN: the page and its configuration name nothing off this origin.
    let files = repo().join("static/swagger");
    for (file, content_type) in [
        ("swagger-ui-bundle.js", "text/javascript"),
        ("swagger-initializer.js", "text/javascript"),
        ("swagger-ui.css", "text/css"),
        ("favicon-32x32.png", "image/png"),
        ("favicon-16x16.png", "image/png"),
    ] {
        let response = group.get(&format!("/swagger/{file}")).unwrap();
        assert_eq!(response.status(), 200, "{file}");
        let served_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            served_type.starts_with(content_type),
            "{file}: {served_type}"
        );
        let bytes = response.bytes().unwrap();
        assert_eq!(bytes, std::fs::read(files.join(file)).unwrap(), "{file}");
    }
    let initializer = std::fs::read_to_string(files.join("swagger-initializer.js")).unwrap();
    assert!(initializer.contains(r#"url: "../api/openapi.json""#));
    for text in [&html, &initializer] {
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{text}"
        );
    }
    let document: Value = group.get("/api/openapi.json").unwrap().json().unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    // A real browser: the page runs, loads the document and shows every operation and the
    // Authorize button.
    let Some(chromium) = chromium("Swagger UI was checked without a browser") else {
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let browse = |args: &[&str]| {
        let output = Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--ignore-certificate-errors",
                "--virtual-time-budget=20000",
                "--window-size=1280,1800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(args)
            .arg(group.url("/swagger/"))
            .output()
            .expect("run chromium");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let dom = browse(&["--dump-dom"]);
    assert!(dom.contains("gatehouse API"), "{dom}");
    assert!(
        dom.contains(r#"class="btn authorize"#),
        "no Authorize button:\n{dom}"
    );
    for path in document["paths"].as_object().unwrap().keys() {
        assert!(
            dom.contains(&format!(r#"data-path="{path}""#)),
            "{path} not shown:\n{dom}"
        );
    }
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("swagger-ui.png");
    browse(&[&format!("--screenshot={}", screenshot.display())]);
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    println!("Swagger UI screenshot: {}", screenshot.display());

    // And as a person would use it: "Try it out" on GET /api/me is refused without a token;
    // after Authorize with a bearer token, the same call answers with the user.
    let token = group.token();
    let mut browser = Browser::launch(&chromium);
    browser.open(&group.url("/swagger/"));
    let answer = browser.evaluate(&SWAGGER_AUTHORIZE.replace("TOKEN", &token));
    assert_eq!(answer["before"]["status"], "401", "{answer}");
    assert_eq!(answer["after"]["status"], "200", "{answer}");
    // The shipped security headers' Content-Security-Policy is on: nothing the page loads or
    // does may be blocked by it.
    let csp = group.get("/swagger/").unwrap();
    assert!(
        csp.headers().contains_key("content-security-policy"),
        "{:?}",
        csp.headers()
    );
    let blocked: Vec<_> = browser
        .log()
        .iter()
        .filter(|line| line.contains("Content Security Policy"))
        .collect();
    assert!(blocked.is_empty(), "{blocked:#?}");
    let body: Value = serde_json::from_str(answer["after"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"username": USER, "role": "admin", "active": true})
    );
    let url = answer["after"]["url"].as_str().unwrap_or_default();
    assert!(
        url.ends_with("/api/me") && !url.contains("/flask/"),
        "{answer}"
    );

    // Under /flask/: the page loads the document through the prefix, the document names it
    // as its server, and "Try it out" goes through it.
    let prefixed: Value = group
        .get("/flask/api/openapi.json")
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(prefixed["servers"], json!([{"url": "/flask"}]));
    browser.open(&group.url("/flask/swagger/"));
    let answer = browser.evaluate(&SWAGGER_AUTHORIZE.replace("TOKEN", &token));
    assert_eq!(answer["before"]["status"], "401", "{answer}");
    assert_eq!(answer["after"]["status"], "200", "{answer}");
    let url = answer["after"]["url"].as_str().unwrap_or_default();
    assert!(url.ends_with("/flask/api/me"), "{answer}");
}

/// Drives Swagger UI in the page: "Try it out" and "Execute" on GET /api/me, then Authorize
/// with the bearer token `TOKEN`, then "Execute" again. Returns both answers as shown.
const SWAGGER_AUTHORIZE: &str = r##"(async () => {
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  const find = async (selector, what) => {
    for (let i = 0; i < 300; i++) {
      const found = document.querySelector(selector);
      if (found) return found;
      await sleep(50);
    }
    throw new Error(`no ${what} (${selector}) on the page`);
  };
  const op = "#operations-users-me";
  const execute = async () => {
    const old = document.querySelector(`${op} .live-responses-table`);
    if (old) (await find(`${op} .btn-clear`, "Clear")).click();
    await sleep(100);
    (await find(`${op} .execute`, "Execute")).click();
    const status = await find(`${op} .live-responses-table .response .response-col_status`, "a response");
    const body = await find(`${op} .live-responses-table .response-col_description pre`, "a body");
    const url = document.querySelector(`${op} .request-url pre`);
    return {status: status.textContent.trim(), body: body.textContent, url: url && url.textContent};
  };
  (await find(`${op} .opblock-summary-control`, "GET /api/me")).click();
  (await find(`${op} .try-out__btn`, "Try it out")).click();
  const before = await execute();
  (await find(".auth-wrapper .authorize", "Authorize")).click();
  // The dialog has a form per scheme (the API key's too): the bearer token's.
  await find(".auth-container input", "the token fields");
  const bearer = [...document.querySelectorAll(".auth-container")]
    .find((form) => (form.querySelector("h4") || {}).textContent.includes("bearer"));
  if (!bearer) throw new Error("no bearer form in the Authorize dialog");
  const input = bearer.querySelector("input");
  // React watches the value through its own setter and the input event.
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set.call(input, "TOKEN");
  input.dispatchEvent(new Event("input", {bubbles: true}));
  bearer.querySelector(".auth-btn-wrapper .authorize").click();
  (await find(".auth-btn-wrapper .btn-done", "Close")).click();
  const after = await execute();
  return {before, after};
})()"##;
