//! Virtual hosts: routes for some hosts only, a certificate per name chosen by SNI (checked
//! with `openssl s_client -servername` and `curl --resolve`), redirect and HSTS per site, and
//! a reload that moves a site to another name with its certificate while clients keep being
//! served.

use std::{fs, path::Path, process::Command};

use crate::{
    operations::{Load, edit_config},
    util::{self, Group, Options, wait_until},
};

/// A certificate for `names`, signed by itself, written to `dir/NAME.crt` and `.key`.
fn certificate(dir: &Path, file: &str, names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let pair = rcgen::generate_simple_self_signed(names).expect("certificate");
    let (cert, key) = (
        dir.join(format!("{file}.crt")),
        dir.join(format!("{file}.key")),
    );
    fs::write(&cert, pair.cert.pem()).expect("write the certificate");
    fs::write(&key, pair.signing_key.serialize_pem()).expect("write the key");
    (cert.display().to_string(), key.display().to_string())
}

/// A static site whose index says `text`.
fn site(dir: &Path, name: &str, text: &str) -> String {
    let root = dir.join(name);
    fs::create_dir_all(&root).expect("site dir");
    fs::write(root.join("index.html"), format!("<p>{text}</p>\n")).expect("index");
    root.display().to_string()
}

/// The DNS names of the certificate the HTTPS port presents to a client asking for `sni`.
fn presented(port: u16, sni: &str) -> String {
    util::served_certificate(port, sni, &["-ext", "subjectAltName"])
}

/// `curl https://HOST:PORT/PATH` with HOST resolved to loopback (so SNI and `Host` are HOST),
/// and `args`; the body, then the status on a line of its own.
fn fetch_with(port: u16, host: &str, path: &str, args: &[&str]) -> String {
    let output = Command::new("curl")
        .args([
            "-sk",
            "--http1.1",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
        ])
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(args)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn fetch(port: u16, host: &str, path: &str) -> String {
    fetch_with(port, host, path, &[])
}

/// The response head (status line and headers, lower-cased) of `GET scheme://HOST:PORT/PATH`,
/// HOST resolved to loopback.
fn head(scheme: &str, port: u16, host: &str, path: &str) -> String {
    let output = Command::new("curl")
        .args(["-sk", "--http1.1", "--max-time", "10", "-o", "/dev/null"])
        .args(["-D", "-"])
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .arg(format!("{scheme}://{host}:{port}{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout).to_ascii_lowercase()
}

#[test]
fn hosts_get_their_own_routes_and_certificates_and_a_reload_moves_them() {
    let files = tempfile::tempdir().expect("temp dir");
    let dir = files.path();
    let (shop_cert, shop_key) = certificate(dir, "shop", &["shop.test", "*.shop.test"]);
    let (blog_cert, blog_key) = certificate(dir, "blog", &["blog.test"]);
    let (news_cert, news_key) = certificate(dir, "news", &["news.test"]);
    let (shop, blog) = (site(dir, "shop", "the shop"), site(dir, "blog", "the blog"));
    let group = Group::start(Options {
        backends: 1,
        extra: format!(
            "[[tls.certificates]]\ncert = {shop_cert:?}\nkey = {shop_key:?}\n\
             [[tls.certificates]]\ncert = {blog_cert:?}\nkey = {blog_key:?}\n\
             [[routes]]\nprefix = \"/\"\nhosts = [\"shop.test\", \"*.shop.test\"]\nstatic_dir = {shop:?}\n\
             [[routes]]\nprefix = \"/\"\nhosts = [\"blog.test\"]\nstatic_dir = {blog:?}\n\
             [[routes]]\nprefix = \"/api/\"\nhosts = [\"blog.test\"]\nupstream = \"backends\"\n\
             [[tls.sites]]\nhosts = [\"blog.test\"]\nredirect_http = false\nhsts = \"off\"\n"
        ),
        ..Options::default()
    });
    let port = group.tls_port.expect("HTTPS");

    // Each host its site; the default site for every other; a site's routes are its own.
    let seen = |host: &str, path: &str| fetch(port, host, path);
    assert!(
        seen("shop.test", "/").contains("the shop"),
        "{}",
        seen("shop.test", "/")
    );
    assert!(seen("a.b.shop.test", "/").contains("the shop"));
    assert!(seen("blog.test", "/").contains("the blog"));
    assert!(seen("blog.test", "/api/ping").contains(r#"{"status":"ok"}"#));
    assert!(
        seen("shop.test", "/api/ping").ends_with("\n404"),
        "{}",
        seen("shop.test", "/api/ping")
    );
    let default = seen("localhost", "/");
    assert!(
        default.contains("gatehouse") && default.ends_with("\n200"),
        "{default}"
    );
    assert!(
        seen("SHOP.test", "/").contains("the shop"),
        "hosts are matched in any case"
    );
    assert!(
        seen("shop.test.", "/").contains("the shop"),
        "a final dot changes nothing"
    );

    // The target's authority names the site; a `Host` naming another site is refused
    // (by Pingora's parser), never routed by one and sent on with the other.
    let target = format!("https://blog.test:{port}/api/ping");
    let matching = fetch_with(port, "blog.test", "/", &["--request-target", &target]);
    assert!(matching.contains(r#"{"status":"ok"}"#), "{matching}");
    let mismatched = fetch_with(port, "shop.test", "/", &["--request-target", &target]);
    assert!(mismatched.ends_with("\n400"), "{mismatched}");
    // A host that cannot be read is refused, not served by the default site.
    let bad = fetch_with(port, "shop.test", "/", &["-H", "Host: shop_test"]);
    assert!(bad.ends_with("\n400") && bad.contains("bad_host"), "{bad}");

    // Redirect and HSTS per site: the blog is served over plain HTTP too and sends no HSTS;
    // the shop and the default site keep [tls]'s.
    let plain = group.port;
    let blog_http = head("http", plain, "blog.test", "/");
    assert!(blog_http.starts_with("http/1.1 200"), "{blog_http}");
    let shop_http = head("http", plain, "shop.test", "/x?y");
    assert!(
        shop_http.starts_with("http/1.1 301")
            && shop_http.contains(&format!("location: https://shop.test:{port}/x?y")),
        "{shop_http}"
    );
    assert!(head("http", plain, "localhost", "/").starts_with("http/1.1 301"));
    let hsts = "strict-transport-security:";
    let blog_https = head("https", port, "blog.test", "/");
    assert!(
        blog_https.starts_with("http/1.1 200") && !blog_https.contains(hsts),
        "{blog_https}"
    );
    // Errors too.
    assert!(!head("https", port, "blog.test", "/nowhere/").contains(hsts));
    assert!(head("https", port, "shop.test", "/").contains(hsts));
    assert!(head("https", port, "localhost", "/").contains(hsts));

    // Each name its certificate, by SNI; any other name the default one.
    assert!(presented(port, "shop.test").contains("DNS:shop.test"));
    assert!(presented(port, "x.shop.test").contains("DNS:*.shop.test"));
    assert!(presented(port, "blog.test").contains("DNS:blog.test"));
    let other = presented(port, "other.test");
    assert!(
        other.contains("DNS:localhost") && !other.contains(".test"),
        "{other}"
    );

    // A reload moves the blog to news.test, with news.test's certificate, while clients of the
    // default site are served throughout.
    let load = Load::start(&group, "/api/ping", 4);
    edit_config(
        &group,
        &format!("cert = {blog_cert:?}"),
        &format!("cert = {news_cert:?}"),
    );
    edit_config(
        &group,
        &format!("key = {blog_key:?}"),
        &format!("key = {news_key:?}"),
    );
    // Both of the blog's routes, and its redirect and HSTS.
    for _ in 0..3 {
        edit_config(&group, "[\"blog.test\"]", "[\"news.test\"]");
    }
    util::signal(group.pid(), libc::SIGHUP);
    assert!(
        wait_until(std::time::Duration::from_secs(5), || seen("news.test", "/")
            .contains("the blog")),
        "news.test does not serve the blog after the reload"
    );
    assert!(presented(port, "news.test").contains("DNS:news.test"));
    assert!(head("http", plain, "news.test", "/").starts_with("http/1.1 200"));
    assert!(head("http", plain, "blog.test", "/").starts_with("http/1.1 301"));
    assert!(!head("https", port, "news.test", "/").contains(hsts));
    assert!(
        seen("blog.test", "/").contains("gatehouse"),
        "blog.test is the default site now"
    );
    load.finish_without_failures();
}
