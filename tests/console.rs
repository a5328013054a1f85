//! The admin console (`static/admin/`): its files through the proxy under the shipped security
//! headers, then the console used in headless Chromium, mostly from the keyboard: sign in, the
//! dashboard, a user created and disabled, an API key created and revoked, those events in the
//! audit view, sign out; a viewer's narrower console, and a token revoked behind its back; and
//! a screenshot of the dashboard checked for the landing page's colours.

use std::{io::Read, path::Path};

use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    browser::{Browser, chromium},
    util::{Group, Options, PASSWORD, USER, expect},
};

const NEW_USER: &str = "console-user";
const NEW_KEY: &str = "console-key";
const VIEWER: &str = "console-viewer";

#[test]
fn the_console_is_served_as_static_files_under_a_strict_policy() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let page = group.get("/admin/").unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name}: {headers:?}"))
            .to_str()
            .unwrap()
            .to_string()
    };
    assert!(header("content-type").starts_with("text/html"));
    assert_eq!(header("cache-control"), "no-cache");
    assert_eq!(header("x-content-type-options"), "nosniff");
    let policy = header("content-security-policy");
    assert!(policy.starts_with("default-src 'self';"), "{policy}");
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    // Stricter than the other sites: framed by no page, no referrer, no other origin.
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    assert_eq!(header("x-frame-options"), "DENY");
    assert_eq!(header("referrer-policy"), "no-referrer");
    let html = page.text().unwrap();
    // Nothing inline for the policy to block, and nothing from elsewhere.
    let lower = html.to_ascii_lowercase();
    for inline in [
        "<style",
        " style=",
        "<script>",
        "javascript:",
        " onclick=",
        " onload=",
    ] {
        assert!(!lower.contains(inline), "{inline} in the page");
    }
    for file in ["console.js", "style.css", "logo.svg", "favicon.svg"] {
        assert!(html.contains(&format!("\"{file}\"")), "{file} not named");
    }
    for (file, content_type) in [
        ("console.js", "text/javascript"),
        ("style.css", "text/css"),
        ("logo.svg", "image/svg+xml"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let response = group.get(&format!("/admin/{file}")).unwrap();
        assert_eq!(response.status(), 200, "{file}");
        let served = response.headers()["content-type"].to_str().unwrap();
        assert!(served.starts_with(content_type), "{file}: {served}");
        let text = response.text().unwrap();
        // (An SVG's namespace is a name, not a fetch.)
        if !file.ends_with(".svg") {
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{file} names another origin"
            );
        }
        if file == "console.js" {
            // The token lives in this tab only.
            assert!(
                !text.contains("localStorage"),
                "console.js uses localStorage"
            );
            assert!(text.contains("sessionStorage"));
        }
    }
}

#[test]
fn the_console_in_a_browser() {
    let Some(chromium) = chromium("the console was not driven in a browser") else {
        return;
    };
    let group = Group::start(Options {
        backends: 2,
        ..Options::default()
    });
    let admin = group.token();
    let mut browser = Browser::launch(&chromium);
    browser.open(&group.url("/admin/"));

    // Signed out: the sign-in form, with the keyboard already in its first field.
    let start = run(
        &mut browser,
        r##"await until("the sign-in form", () => shown("#sign-in") && document.body.classList.contains("ready"));
           return {focus: document.activeElement.id, nav: shown("#nav"), dashboard: shown("#dashboard")};"##,
    );
    assert_eq!(
        start,
        json!({"focus": "sign-in-username", "nav": false, "dashboard": false})
    );

    // Sign in with the keyboard alone.
    browser.type_text(USER);
    browser.press("Tab");
    browser.type_text(PASSWORD);
    browser.press("Enter");
    let signed_in = run(
        &mut browser,
        r##"await until("the dashboard", () => shown("#dashboard") && text("#me-username") === "admin" && text("#status"));
           return {focus: document.activeElement.id, token: sessionStorage.getItem("gatehouse.console.token"),
                   local: localStorage.length, role: text("#me-role"), active: text("#me-active"),
                   status: text("#status"), admin: shown("#nav a[href='#users']")};"##,
    );
    assert_eq!(signed_in["focus"], "dashboard-title", "{signed_in}");
    assert_eq!(signed_in["local"], 0, "localStorage holds something");
    assert_eq!(signed_in["role"], "admin");
    assert_eq!(signed_in["active"], "yes");
    assert_eq!(signed_in["admin"], true);
    assert!(
        signed_in["status"]
            .as_str()
            .unwrap()
            .contains("Signed in as admin"),
        "{signed_in}"
    );
    let token = signed_in["token"]
        .as_str()
        .expect("the token in sessionStorage")
        .to_string();
    expect(
        group.call(Method::GET, "/api/me", &token, None),
        200,
        "the page's token",
    );

    // The dashboard: the count, a hello, and the group's health with requests per second from
    // two polls.
    let dashboard = run(
        &mut browser,
        r##"await until("the count and the hello", () => /^\d+$/.test(text("#count")) && text("#hello"));
           await until("requests per second", () => /^\d+\.\d$/.test(text("#health-rps")), 20);
           return {count: text("#count"), hello: text("#hello"), backends: text("#health-backends"),
                   redis: text("#health-redis"), rps: text("#health-rps")};"##,
    );
    assert!(dashboard["count"].as_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(dashboard["hello"], "Hello, admin!", "{dashboard}");
    assert_eq!(dashboard["backends"], "2 of 2", "{dashboard}");
    assert_eq!(dashboard["redis"], "up", "{dashboard}");
    let rps: f64 = dashboard["rps"].as_str().unwrap().parse().unwrap();
    assert!(rps > 0.0, "{dashboard}");
    check_screenshot(&mut browser);

    // Users, reached from the navigation with the keyboard.
    go_to(&mut browser, "users");
    run(
        &mut browser,
        r##"await until("the users", () => $("#users-rows tr[data-user='admin']"));"##,
    );
    // "Skip to content" from the keyboard: the focus goes to the main content and the users stay
    // on show; so do they after "Back to top", and after a fragment that names no view.
    run(&mut browser, r##"$("a.skip").focus();"##);
    browser.press("Enter");
    let skipped = run(
        &mut browser,
        r##"const settle = () => new Promise((done) => setTimeout(done, 300));
           const state = () => ({users: shown("#users"), dashboard: shown("#dashboard"),
                                 focus: document.activeElement.id, hash: location.hash});
           await until("the main content focused", () => document.activeElement.id === "content");
           await settle();
           const skip = state();
           $("#users-title").focus();
           $(".site-footer a[href='#content']").click();
           await settle();
           const top = state();
           $("#users-title").focus();
           location.hash = "#content";
           await until("the address naming the view again", () => location.hash === "#users");
           await settle();
           return [skip, top, state()];"##,
    );
    for state in skipped.as_array().unwrap() {
        assert_eq!(
            state,
            &json!({"users": true, "dashboard": false, "focus": "content", "hash": "#users"}),
            "{skipped}"
        );
    }
    // A user created from the keyboard: name, password, then Tab past the role (viewer) and
    // the "active" box to the button.
    run(&mut browser, r##"$("#user-create-username").focus();"##);
    browser.type_text(NEW_USER);
    browser.press("Tab");
    browser.type_text("a console password");
    for _ in 0..3 {
        browser.press("Tab");
    }
    browser.press("Enter");
    let created = run(
        &mut browser,
        &r##"await until("the new user's row", () => $("#users-rows tr[data-user='NAME']"));
            return [...$("#users-rows tr[data-user='NAME']").children].slice(0, 3).map((c) => c.textContent);"##
            .replace("NAME", NEW_USER),
    );
    assert_eq!(created, json!([NEW_USER, "viewer", "active"]));
    assert_eq!(
        user(&group, &admin),
        json!({"username": NEW_USER, "role": "viewer", "active": true})
    );

    // The API's refusal is shown with its status and request id: the name is taken now.
    let refused = run(
        &mut browser,
        &r##"fill("#user-create-username", "NAME");
            fill("#user-create-password", "another password");
            $("#user-create-form button[type=submit]").click();
            await until("the error", () => shown("#error") && text("#error"));
            return text("#error");"##
            .replace("NAME", NEW_USER),
    );
    let refused = refused.as_str().unwrap();
    assert!(refused.contains("Could not create the user"), "{refused}");
    assert!(refused.contains("HTTP 409"), "{refused}");
    let request_id = refused
        .split("request id ")
        .nth(1)
        .and_then(|rest| rest.split([')', ';']).next())
        .unwrap_or_else(|| panic!("no request id in {refused:?}"));
    assert!(request_id.len() >= 8, "{refused}");

    // Disabled from the keyboard: the focus comes back to the same user's new button.
    run(
        &mut browser,
        &r##"$("button[aria-label='Disable NAME']").focus();"##.replace("NAME", NEW_USER),
    );
    browser.press("Enter");
    let disabled = run(
        &mut browser,
        &r##"await until("the user disabled", () => text("#users-rows tr[data-user='NAME'] td:nth-of-type(2)") === "disabled");
            return {focus: document.activeElement.getAttribute("aria-label"), status: text("#status")};"##
            .replace("NAME", NEW_USER),
    );
    assert_eq!(
        disabled["focus"],
        format!("Enable {NEW_USER}"),
        "{disabled}"
    );
    assert_eq!(user(&group, &admin)["active"], false);

    // Its role changed in the edit form, which sends only what changed.
    let changed = run(
        &mut browser,
        &r##"$("button[aria-label='Edit NAME']").click();
            await until("the edit form", () => shown("#user-edit-form") && document.activeElement.id === "user-edit-title");
            $("#user-edit-role").value = "maintainer";
            $("#user-edit-form button[type=submit]").click();
            await until("the change", () => !shown("#user-edit-form") && text("#status"));
            return {status: text("#status"), focus: document.activeElement.getAttribute("aria-label")};"##
            .replace("NAME", NEW_USER),
    );
    assert_eq!(
        changed,
        json!({"status": format!("{NEW_USER} changed (role): maintainer, disabled."), "focus": format!("Edit {NEW_USER}")})
    );
    assert_eq!(
        user(&group, &admin),
        json!({"username": NEW_USER, "role": "maintainer", "active": false})
    );

    // An API key: created, shown once, listed without it, revoked through the dialog.
    go_to(&mut browser, "keys");
    run(
        &mut browser,
        r##"await until("the keys", () => $("#keys-rows tr"));
           $("#key-create-name").focus();"##,
    );
    browser.type_text(NEW_KEY);
    browser.press("Tab");
    browser.press("Tab");
    browser.press("Enter");
    let shown = run(
        &mut browser,
        &r##"await until("the new key", () => shown("#key-shown") && $("#key-shown-value").value);
            await until("its row", () => [...document.querySelectorAll("#keys-rows th")].some((th) => th.textContent === "NAME"));
            return {key: $("#key-shown-value").value, focus: document.activeElement.id,
                    table: $("#keys-rows").textContent, id: $("#keys-rows tr[data-key]").dataset.key};"##
            .replace("NAME", NEW_KEY),
    );
    let key = shown["key"].as_str().unwrap();
    assert!(key.len() >= 32, "{shown}");
    assert_eq!(shown["focus"], "key-shown-title");
    assert!(
        !shown["table"].as_str().unwrap().contains(key),
        "the key is listed"
    );
    let keys = expect(
        group.call(Method::GET, "/api/keys", &admin, None),
        200,
        "keys",
    );
    let listed = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == NEW_KEY)
        .unwrap_or_else(|| panic!("{keys}"))
        .clone();
    let key_id = listed["id"].as_str().unwrap().to_string();
    assert_eq!(shown["id"], key_id.as_str());
    assert!(listed.get("key").is_none(), "{listed}");
    let dismissed = run(
        &mut browser,
        r##"$("#key-dismiss").click();
           return {value: $("#key-shown-value").value, shown: shown("#key-shown")};"##,
    );
    assert_eq!(dismissed, json!({"value": "", "shown": false}));
    run(
        &mut browser,
        &r##"$("#keys-rows tr[data-key='ID'] button").focus();"##.replace("ID", &key_id),
    );
    browser.press("Enter");
    let dialog = run(
        &mut browser,
        r##"await until("the dialog", () => $("#confirm").open);
           return {focus: document.activeElement.id, title: text("#confirm-title")};"##,
    );
    // Cancel has the focus: Enter alone would not revoke anything.
    assert_eq!(dialog["focus"], "confirm-no", "{dialog}");
    assert_eq!(dialog["title"], format!("Revoke {NEW_KEY}?"));
    browser.press("Shift+Tab");
    browser.press("Enter");
    run(
        &mut browser,
        &r##"await until("the key gone", () => !$("#confirm").open && !$("#keys-rows tr[data-key='ID']"));"##
            .replace("ID", &key_id),
    );
    let keys = expect(
        group.call(Method::GET, "/api/keys", &admin, None),
        200,
        "keys",
    );
    assert!(
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["id"] != key_id.as_str()),
        "{keys}"
    );

    // The audit view holds all of it.
    go_to(&mut browser, "audit");
    let events = run(
        &mut browser,
        r##"await until("the events", () => $("#audit-rows tr[data-event]"));
           return [...document.querySelectorAll("#audit-rows tr[data-event]")].map((row) =>
             [row.dataset.event, ...[...row.children].map((c) => c.textContent)]);"##,
    );
    let events = events.as_array().unwrap();
    // Each row: the event, then its cells (time, event, actor, target, outcome, ...).
    let find = |event: &str, target: &str| {
        events.iter().any(|row| {
            row[0] == event
                && row[3].as_str().unwrap().contains(USER)
                && row[4].as_str().unwrap().contains(target)
        })
    };
    for (event, target) in [
        ("user.created", NEW_USER),
        ("user.disabled", NEW_USER),
        ("user.changed", NEW_USER),
        ("key.created", NEW_KEY),
        ("key.revoked", NEW_KEY),
    ] {
        assert!(find(event, target), "no {event} of {target}: {events:#?}");
    }
    assert!(
        events.iter().any(|row| row[0] == "login.succeeded"),
        "{events:#?}"
    );
    // Filtered to one user's events.
    let filtered = run(
        &mut browser,
        &r##"fill("#audit-filter", "NAME");
            return [...document.querySelectorAll("#audit-rows tr[data-event]")].map((row) => row.dataset.event);"##
            .replace("NAME", NEW_USER),
    );
    let filtered: Vec<&str> = filtered
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        filtered.contains(&"user.created") && filtered.contains(&"user.disabled"),
        "{filtered:?}"
    );
    assert!(!filtered.contains(&"key.created"), "{filtered:?}");

    // Sign out from the keyboard while the dashboard waits for an answer (`GET /api/me`, held
    // back in the page): the token is revoked and forgotten, what the API showed is gone from
    // the page, and the late answer brings none of it back.
    go_to(&mut browser, "dashboard");
    run(
        &mut browser,
        r##"await until("the count", () => /^\d+$/.test(text("#count")));
           const fetched = window.fetch;
           let release;
           const gate = new Promise((done) => (release = done));
           window.heldBack = {count: 0, release: () => { window.fetch = fetched; release(); }};
           window.fetch = async (url, init) => {
             const answer = await fetched(url, init);
             if (new URL(url).pathname.endsWith("/api/me")) {
               window.heldBack.count++;
               await gate;
             }
             return answer;
           };
           $("#dashboard-refresh").click();
           await until("the answer held back", () => window.heldBack.count > 0);
           $("#sign-out").focus();"##,
    );
    browser.press("Enter");
    let signed_out = run(
        &mut browser,
        r##"await until("the sign-in form", () => shown("#sign-in") && text("#status"));
           window.heldBack.release();
           await new Promise((done) => setTimeout(done, 500));
           return {token: sessionStorage.getItem("gatehouse.console.token"), rows: $("#audit-rows").children.length,
                   status: text("#status"), focus: document.activeElement.id, nav: shown("#nav"),
                   dashboard: shown("#dashboard"), error: shown("#me-error"),
                   fields: ["#me-username", "#me-role", "#me-active", "#count", "#hello", "#whoami-short"].map(text)};"##,
    );
    assert_eq!(
        signed_out,
        json!({"token": null, "rows": 0, "status": "Signed out.", "focus": "sign-in-username", "nav": false,
               "dashboard": false, "error": false, "fields": ["…", "…", "…", "…", "", ""]})
    );
    // An admin's view asked for by its address: still the sign-in form.
    let asked = run(
        &mut browser,
        r##"location.hash = "#users";
           await new Promise((done) => setTimeout(done, 300));
           return {sign_in: shown("#sign-in"), users: shown("#users"), nav: shown("#nav")};"##,
    );
    assert_eq!(
        asked,
        json!({"sign_in": true, "users": false, "nav": false})
    );
    expect(
        group.call(Method::GET, "/api/me", &token, None),
        401,
        "the page's token after sign-out",
    );

    // A viewer, in a tab of its own: the dashboard's first two cards, nothing of the admins'.
    expect(
        group.call(
            Method::POST,
            "/api/users",
            &admin,
            Some(json!({"username": VIEWER, "password": "a viewer password", "role": "viewer"})),
        ),
        201,
        "the viewer",
    );
    browser.open(&group.url("/admin/#users"));
    let viewer = run(
        &mut browser,
        &r##"await until("the sign-in form", () => shown("#sign-in") && document.body.classList.contains("ready"));
            fill("#sign-in-username", "NAME");
            fill("#sign-in-password", "a viewer password");
            $("#sign-in-form button[type=submit]").click();
            await until("the dashboard", () => shown("#dashboard") && text("#hello"));
            return {hello: text("#hello"), role: text("#me-role"), users: shown("#users"),
                    links: [...document.querySelectorAll("#nav a")].filter((a) => !a.closest("[hidden]")).map((a) => a.textContent),
                    health: shown("#health-title"), token: sessionStorage.getItem("gatehouse.console.token")};"##
            .replace("NAME", VIEWER),
    );
    assert_eq!(viewer["hello"], format!("Hello, {VIEWER}!"), "{viewer}");
    assert_eq!(viewer["role"], "viewer");
    assert_eq!(viewer["users"], false, "{viewer}");
    assert_eq!(viewer["links"], json!(["Dashboard"]), "{viewer}");
    assert_eq!(viewer["health"], false, "{viewer}");
    // Its token revoked behind the page's back: the next call returns it to the sign-in form,
    // saying why.
    let viewer_token = viewer["token"].as_str().unwrap();
    let logout = group.call(Method::POST, "/auth/logout", viewer_token, None);
    assert_eq!(logout.status(), 204);
    let ended = run(
        &mut browser,
        r##"$("#count-again").click();
            await until("the sign-in form", () => shown("#sign-in") && text("#status"));
            return {status: text("#status"), token: sessionStorage.getItem("gatehouse.console.token")};"##,
    );
    let status = ended["status"].as_str().unwrap();
    assert!(
        status.starts_with("You were signed out") && status.contains("HTTP 401"),
        "{ended}"
    );
    assert_eq!(ended["token"], Value::Null);

    // Nothing the console did was blocked by the Content-Security-Policy, nor threw.
    let problems: Vec<_> = browser
        .log()
        .iter()
        .filter(|line| line.contains("Content Security Policy") || line.starts_with("exception"))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The new user, as the API has it.
fn user(group: &Group, admin: &str) -> Value {
    let users = expect(
        group.call(Method::GET, "/api/users", admin, None),
        200,
        "users",
    );
    users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == NEW_USER)
        .unwrap_or_else(|| panic!("{users}"))
        .clone()
}

/// Follows the navigation's link to `view` with the keyboard, and checks that the view shows
/// with the focus on its heading.
fn go_to(browser: &mut Browser, view: &str) {
    run(
        browser,
        &format!(r##"$("#nav a[href='#{view}']").focus();"##),
    );
    browser.press("Enter");
    let focus = run(
        browser,
        &format!(
            r##"await until("the {view} view", () => shown("#{view}") && document.activeElement.id === "{view}-title");
                return $("#nav a[aria-current='page']").getAttribute("href");"##
        ),
    );
    assert_eq!(focus, format!("#{view}"));
}

/// Runs `body` in the page as an async function with the helpers below, and gives what it
/// returns. `until` waits for a condition (15 s unless told) and fails with the page's
/// notices.
fn run(browser: &mut Browser, body: &str) -> Value {
    browser.evaluate(&format!(
        r##"(async () => {{
  const $ = (selector) => document.querySelector(selector);
  const text = (selector) => ($(selector) ? $(selector).textContent.trim() : null);
  const shown = (selector) => Boolean($(selector)) && !$(selector).closest("[hidden]");
  const fill = (selector, value) => {{
    $(selector).value = value;
    $(selector).dispatchEvent(new Event("input", {{bubbles: true}}));
  }};
  const until = async (what, check, seconds = 15) => {{
    for (let i = 0; i < seconds * 20; i++) {{
      if (check()) return;
      await new Promise((done) => setTimeout(done, 50));
    }}
    throw new Error(`waited ${{seconds}} s for ${{what}}; status: ${{text("#status")}}; error: ${{text("#error")}}`);
  }};
  {body}
}})()"##
    ))
}

/// A screenshot of the dashboard, saved and looked at: the size asked for, not blank, and the
/// landing page's colours where the style puts them (the header's ink, the primary button's
/// and the cards' accent).
fn check_screenshot(browser: &mut Browser) {
    let places = run(
        browser,
        r##"const box = (selector) => { const r = $(selector).getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
           return {ratio: window.devicePixelRatio, width: innerWidth, height: innerHeight,
                   header: box(".site-header"), button: box("#dashboard-refresh"), card: box(".card")};"##,
    );
    let png = browser.screenshot();
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    println!("console screenshot: {}", path.display());
    let image = Png::decode(&png);
    let ratio = places["ratio"].as_f64().unwrap();
    let css = |key: &str| places[key].as_f64().unwrap();
    assert_eq!(
        image.width as f64,
        (css("width") * ratio).round(),
        "{places}"
    );
    assert_eq!(
        image.height as f64,
        (css("height") * ratio).round(),
        "{places}"
    );
    // (x, y) within the box `name`, in CSS pixels from its top left corner.
    let at = |name: &str, x: f64, y: f64| {
        let b = places[name].as_array().unwrap();
        let (left, top) = (b[0].as_f64().unwrap(), b[1].as_f64().unwrap());
        image.pixel(((left + x) * ratio) as u32, ((top + y) * ratio) as u32)
    };
    let ink = [0x1d, 0x2b, 0x3a];
    let accent = [0x0b, 0x6e, 0x69];
    assert_eq!(at("header", 4.0, 4.0), ink, "the header");
    // Inside the button's padding, clear of its rounded corners and its label.
    assert_eq!(at("button", 12.0, 3.0), accent, "the Refresh button");
    // The card's top border, 4 px of accent.
    assert_eq!(at("card", 24.0, 1.5), accent, "a card's top border");
    let colours: std::collections::HashSet<[u8; 3]> = image.pixels.iter().copied().collect();
    assert!(
        colours.len() > 100,
        "{} colours: a blank page?",
        colours.len()
    );
}

/// An 8-bit RGB or RGBA PNG without interlacing, as Chromium writes them, decoded to RGB.
struct Png {
    width: u32,
    height: u32,
    pixels: Vec<[u8; 3]>,
}

impl Png {
    fn decode(bytes: &[u8]) -> Png {
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        let (mut at, mut header, mut data) = (8, None, Vec::new());
        while at + 8 <= bytes.len() {
            let length = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = &bytes[at + 4..at + 8];
            let body = &bytes[at + 8..at + 8 + length];
            match kind {
                b"IHDR" => header = Some(body.to_vec()),
                b"IDAT" => data.extend_from_slice(body),
                _ => {}
            }
            at += 12 + length;
        }
        let header = header.expect("IHDR");
        let width = u32::from_be_bytes(header[0..4].try_into().unwrap());
        let height = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let (depth, colour, interlace) = (header[8], header[9], header[12]);
        let channels = match colour {
            2 => 3,
            6 => 4,
            other => panic!("PNG colour type {other}"),
        };
        assert_eq!((depth, interlace), (8, 0), "8 bits, not interlaced");
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&data[..])
            .read_to_end(&mut raw)
            .expect("inflate");
        let stride = width as usize * channels;
        assert_eq!(raw.len(), (stride + 1) * height as usize, "image data size");
        let mut rows: Vec<u8> = Vec::with_capacity(stride * height as usize);
        for y in 0..height as usize {
            let filter = raw[y * (stride + 1)];
            let line = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
            let start = rows.len();
            for (x, &byte) in line.iter().enumerate() {
                let left = if x >= channels {
                    rows[start + x - channels]
                } else {
                    0
                };
                let up = if y > 0 { rows[start + x - stride] } else { 0 };
                let up_left = if y > 0 && x >= channels {
                    rows[start + x - stride - channels]
                } else {
                    0
                };
                let predicted = match filter {
                    0 => 0,
                    1 => left,
                    2 => up,
                    3 => ((left as u16 + up as u16) / 2) as u8,
                    4 => paeth(left, up, up_left),
                    other => panic!("PNG filter {other}"),
                };
                rows.push(byte.wrapping_add(predicted));
            }
        }
        let pixels = rows.chunks(channels).map(|p| [p[0], p[1], p[2]]).collect();
        Png {
            width,
            height,
            pixels,
        }
    }

    fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        assert!(
            x < self.width && y < self.height,
            "({x}, {y}) is off the image"
        );
        self.pixels[(y * self.width + x) as usize]
    }
}

fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = a as i16 + b as i16 - c as i16;
    let (pa, pb, pc) = (
        (p - a as i16).abs(),
        (p - b as i16).abs(),
        (p - c as i16).abs(),
    );
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}
