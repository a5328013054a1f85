//! A route's header rules: headers removed, set and added on the request towards the backend
//! or on the response towards the client, with values that may name a few variables
//! (`$client_ip`, `$request_id`, `$scheme`, `$host`). Names and values are parsed once, when
//! the config is loaded; a route without rules costs a length check per request.

use std::net::IpAddr;

use http::{HeaderName, HeaderValue};
use pingora::{
    ErrorType::InvalidHTTPHeader,
    OrErr, Result,
    http::{RequestHeader, ResponseHeader},
};

/// Which way a rule's headers travel; each way has headers the edge keeps to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// Connection-level and framing headers: the edge writes these for each hop, and a rule that
/// changed them would corrupt the message or the connection.
const FRAMING: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "http2-settings",
];

/// Request headers the edge sets itself: the backend's view of the client must stay the
/// edge's (see `forwarding_headers`), and `Host` names the site the client asked for; the
/// client certificate's headers ([`crate::client_cert`]) too, or a rule could sign a request
/// in as any user.
const REQUEST_OWN: &[&str] = &[
    "host",
    "x-forwarded-for",
    "x-real-ip",
    "x-forwarded-proto",
    "x-request-id",
    "x-correlation-id",
    "x-client-cert-subject",
    "x-client-cert-san",
    "x-client-cert-fingerprint",
    "x-gatehouse-cert-user",
];

/// Response headers with their own setting: the request and correlation ids, `tls.hsts`, and
/// the encoding the compression negotiates.
const RESPONSE_OWN: &[&str] = &[
    "x-request-id",
    "x-correlation-id",
    "strict-transport-security",
    "content-encoding",
];

/// The header name a rule may change, or why not.
pub fn name(direction: Direction, name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    let own = match direction {
        Direction::Request => REQUEST_OWN,
        Direction::Response => RESPONSE_OWN,
    };
    if FRAMING.contains(&parsed.as_str()) {
        return Err(format!(
            "{name:?} is a connection or framing header, which the edge writes for each hop"
        ));
    }
    if own.contains(&parsed.as_str()) {
        return Err(format!(
            "{name:?} is set by the edge itself and cannot be changed by a rule"
        ));
    }
    Ok(parsed)
}

/// `security_headers = true`: each set on a response that has none of its own. The policy
/// allows what the shipped pages load (their own scripts, styles and images, the `data:`
/// images Swagger UI's stylesheet draws its icons with, and the proxy's own error page's
/// style, by its hash), and framing by pages of the same origin only: the landing page frames
/// the two other sites. `frame-ancestors` is what browsers obey; `X-Frame-Options` is for
/// those too old for it.
pub fn security_headers() -> Result<Vec<(HeaderName, Template)>, String> {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use sha2::Digest;
    let style = STANDARD.encode(sha2::Sha256::digest(
        crate::respond::ERROR_PAGE_STYLE.as_bytes(),
    ));
    let policy = format!(
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'sha256-{style}'; \
         object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'self'"
    );
    [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "SAMEORIGIN"),
        ("referrer-policy", "strict-origin-when-cross-origin"),
        ("content-security-policy", policy.as_str()),
    ]
    .into_iter()
    .map(|(name, value)| {
        Ok((
            name.parse().map_err(|_| name.to_string())?,
            Template::parse(value)?,
        ))
    })
    .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    ClientIp,
    RequestId,
    Scheme,
    Host,
}

impl Var {
    const ALL: [(&'static str, Var); 4] = [
        ("client_ip", Var::ClientIp),
        ("request_id", Var::RequestId),
        ("scheme", Var::Scheme),
        ("host", Var::Host),
    ];
}

#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Var(Var),
}

/// A header value as configured: fixed, or text and variables filled in per request.
#[derive(Debug, Clone)]
pub struct Template(Kind);

#[derive(Debug, Clone)]
enum Kind {
    Fixed(HeaderValue),
    Parts(Box<[Piece]>),
}

impl Template {
    /// Parses `$name` and `${name}` (for a variable followed by letters); `$$` is a `$`.
    pub fn parse(value: &str) -> Result<Self, String> {
        if !value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            return Err(format!(
                "{value:?} is not a valid header value (printable ASCII only)"
            ));
        }
        // HTTP strips it from HTTP/1 values and HTTP/2 refuses a field that has it.
        if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
            return Err(format!(
                "{value:?} starts or ends with white space, which a header value may not"
            ));
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = value;
        while let Some(at) = rest.find('$') {
            text.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(after) = after.strip_prefix('$') {
                text.push('$');
                rest = after;
                continue;
            }
            let (ident, next) = match after.strip_prefix('{') {
                Some(inner) => {
                    let end = inner
                        .find('}')
                        .ok_or_else(|| format!("{value:?}: `${{` without its `}}`"))?;
                    (&inner[..end], &inner[end + 1..])
                }
                None => {
                    let end = after
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(after.len());
                    (&after[..end], &after[end..])
                }
            };
            let var = Var::ALL
                .iter()
                .find(|(n, _)| *n == ident)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    format!(
                        "{value:?}: unknown variable `${ident}`; the variables are $client_ip, \
                         $request_id, $scheme and $host (write $$ for a `$`)"
                    )
                })?;
            if !text.is_empty() {
                parts.push(Piece::Text(std::mem::take(&mut text)));
            }
            parts.push(Piece::Var(var));
            rest = next;
        }
        text.push_str(rest);
        if parts.is_empty() {
            return HeaderValue::from_str(&text)
                .map(|v| Template(Kind::Fixed(v)))
                .map_err(|_| format!("{value:?} is not a valid header value"));
        }
        if !text.is_empty() {
            parts.push(Piece::Text(text));
        }
        Ok(Template(Kind::Parts(parts.into())))
    }

    fn uses_host(&self) -> bool {
        matches!(&self.0, Kind::Parts(parts) if parts.iter().any(|p| matches!(p, Piece::Var(Var::Host))))
    }

    /// The value for this request; `None` when it names `$host` and the request has no valid
    /// host, and the header is then left out.
    fn render(&self, vars: &Vars<'_>) -> Option<HeaderValue> {
        let parts = match &self.0 {
            Kind::Fixed(value) => return Some(value.clone()),
            Kind::Parts(parts) => parts,
        };
        let mut out = Vec::with_capacity(64);
        for part in parts.iter() {
            match part {
                Piece::Text(text) => out.extend_from_slice(text.as_bytes()),
                Piece::Var(Var::ClientIp) => {
                    out.extend_from_slice(vars.client.to_string().as_bytes())
                }
                Piece::Var(Var::RequestId) => out.extend_from_slice(vars.request_id.as_bytes()),
                Piece::Var(Var::Scheme) => {
                    out.extend_from_slice(if vars.tls { b"https" } else { b"http" })
                }
                Piece::Var(Var::Host) => out.extend_from_slice(vars.host?),
            }
        }
        HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
    }
}

/// What a request gives the variables.
#[derive(Debug, Clone, Copy)]
pub struct Vars<'a> {
    pub client: IpAddr,
    pub request_id: &'a str,
    pub tls: bool,
    /// [`request_host`]: the client's, checked.
    pub host: Option<&'a [u8]>,
}

/// The host a request names, as `host[:port]` in lower case: the authority of its target
/// (HTTP/2's `:authority`, an absolute-form target), which wins over any `Host` as it does on
/// the way to the backend (RFC 9112 section 3.2.2, RFC 9113 section 8.3.1), else its `Host`.
/// The client chooses it, so it is `None` unless it is a host name or IP literal and a port:
/// a header made from it can never carry a list, a parameter or a quote.
pub fn request_host(request: &RequestHeader) -> Option<HeaderValue> {
    let host = crate::https_redirect::valid_authority(raw_request_host(request)?)?;
    HeaderValue::from_str(&host).ok()
}

/// The host a request names, as sent (see [`request_host`]).
pub fn raw_request_host(request: &RequestHeader) -> Option<&[u8]> {
    request
        .uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| crate::forward::absolute_form_authority(request.raw_path()))
        .or_else(|| {
            request
                .headers
                .get(http::header::HOST)
                .map(HeaderValue::as_bytes)
        })
        .filter(|host| !host.is_empty())
}

/// One way's rules, applied in this order: `remove`, `set` (replacing), `add` (alongside what
/// is there), then the defaults (set only where the message has none).
#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, Template)>,
    add: Vec<(HeaderName, Template)>,
    defaults: Vec<(HeaderName, Template)>,
    uses_host: bool,
}

impl HeaderRules {
    pub fn remove(&mut self, name: HeaderName) {
        self.remove.push(name);
    }

    pub fn set(&mut self, name: HeaderName, value: Template) {
        self.uses_host |= value.uses_host();
        self.set.push((name, value));
    }

    pub fn add(&mut self, name: HeaderName, value: Template) {
        self.uses_host |= value.uses_host();
        self.add.push((name, value));
    }

    /// A header set only where the message has none of its own: the security headers, where
    /// the backend's own header wins, stricter or weaker.
    pub fn set_if_absent(&mut self, name: HeaderName, value: Template) {
        self.uses_host |= value.uses_host();
        self.defaults.push((name, value));
    }

    /// Whether any rule names `name`, in any list.
    pub fn names(&self, name: &HeaderName) -> bool {
        self.remove.contains(name)
            || [&self.set, &self.add, &self.defaults]
                .iter()
                .any(|list| list.iter().any(|(n, _)| n == name))
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.set.is_empty()
            && self.add.is_empty()
            && self.defaults.is_empty()
    }

    /// Whether a value names `$host`: only then does a request keep its host for the response.
    pub fn uses_host(&self) -> bool {
        self.uses_host
    }

    pub fn apply(&self, header: &mut impl HeaderEdit, vars: &Vars<'_>) -> Result<()> {
        for name in &self.remove {
            header.drop_all(name);
        }
        for (name, value) in &self.set {
            match value.render(vars) {
                Some(value) => header.put(name, value)?,
                None => header.drop_all(name),
            }
        }
        for (name, value) in &self.add {
            if let Some(value) = value.render(vars) {
                header.add(name, value)?;
            }
        }
        for (name, value) in &self.defaults {
            if !header.has(name)
                && let Some(value) = value.render(vars)
            {
                header.put(name, value)?;
            }
        }
        Ok(())
    }
}

/// Header names the proxy sets on every proxied request, made once.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// The few edits the proxy makes to headers: on Pingora's message headers through their own
/// methods, which keep the map of the names' case the peer sent (and title-case and parse the
/// name again on each call), and on a plain `HeaderMap` directly, with the name as it is (the
/// fast path's request and response, which carry no case map).
pub trait HeaderEdit {
    /// Sets `name` to `value`, replacing any values it had.
    fn put(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()>;
    /// Adds `value` beside any values `name` has.
    fn add(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()>;
    /// Removes every value of `name`; returns the first.
    fn take(&mut self, name: &HeaderName) -> Option<HeaderValue>;
    fn drop_all(&mut self, name: &HeaderName) {
        self.take(name);
    }
    fn has(&self, name: &HeaderName) -> bool {
        self.map().contains_key(name)
    }
    fn map(&self) -> &http::HeaderMap;
}

macro_rules! edit_for {
    ($header:ty) => {
        impl HeaderEdit for $header {
            fn put(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
                self.insert_header(name, value)
            }
            fn add(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
                self.append_header(name, value).map(drop)
            }
            fn take(&mut self, name: &HeaderName) -> Option<HeaderValue> {
                self.remove_header(name)
            }
            fn map(&self) -> &http::HeaderMap {
                &self.headers
            }
        }
    };
}

edit_for!(RequestHeader);
edit_for!(ResponseHeader);

impl HeaderEdit for http::HeaderMap {
    fn put(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
        self.try_insert(name.clone(), value)
            .map(drop)
            .or_err(InvalidHTTPHeader, "too many headers")
    }
    fn add(&mut self, name: &HeaderName, value: HeaderValue) -> Result<()> {
        self.try_append(name.clone(), value)
            .map(drop)
            .or_err(InvalidHTTPHeader, "too many headers")
    }
    fn take(&mut self, name: &HeaderName) -> Option<HeaderValue> {
        self.remove(name)
    }
    fn map(&self) -> &http::HeaderMap {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars<'static> {
        Vars {
            client: "192.0.2.7".parse().expect("address"),
            request_id: "abc",
            tls: true,
            host: Some(b"example.com:8443"),
        }
    }

    fn render(value: &str) -> String {
        let template = Template::parse(value).expect("valid");
        let out = template.render(&vars()).expect("renders");
        out.to_str().expect("text").to_owned()
    }

    #[test]
    fn variables_are_filled_in() {
        assert_eq!(render("plain"), "plain");
        assert_eq!(
            render("for=$client_ip;id=$request_id"),
            "for=192.0.2.7;id=abc"
        );
        assert_eq!(render("$scheme://${host}x"), "https://example.com:8443x");
        assert_eq!(render("cost $$5"), "cost $5");
        let no_host = Vars {
            host: None,
            ..vars()
        };
        let template = Template::parse("$scheme://$host").expect("valid");
        assert_eq!(template.render(&no_host), None);
        assert!(matches!(
            Template::parse("plain $$"),
            Ok(Template(Kind::Fixed(_)))
        ));
    }

    #[test]
    fn bad_values_and_names_are_refused() {
        assert!(Template::parse("$nope").is_err());
        assert!(Template::parse("${host").is_err());
        assert!(Template::parse("a\nb").is_err());
        assert!(Template::parse("$").is_err());
        for padded in [" a", "a ", "\ta", "a\t", " "] {
            assert!(Template::parse(padded).is_err(), "{padded:?}");
        }
        for bad in [
            "Content-Length",
            "connection",
            "Transfer-Encoding",
            "Host",
            "x y",
        ] {
            assert!(name(Direction::Request, bad).is_err(), "{bad}");
        }
        assert!(name(Direction::Response, "Strict-Transport-Security").is_err());
        assert!(name(Direction::Response, "Host").is_ok());
        assert_eq!(
            name(Direction::Request, "X-Env").expect("valid").as_str(),
            "x-env"
        );
    }

    #[test]
    fn rules_apply_in_order() {
        let mut rules = HeaderRules::default();
        let n = |s: &str| HeaderName::from_bytes(s.as_bytes()).expect("name");
        let t = |s: &str| Template::parse(s).expect("value");
        rules.remove(n("x-debug"));
        rules.set(n("x-env"), t("prod"));
        rules.add(n("x-tag"), t("b"));
        rules.set_if_absent(n("x-frame-options"), t("DENY"));
        rules.set_if_absent(n("x-kept"), t("edge"));
        let before = [
            ("X-Debug", "1"),
            ("X-Env", "dev"),
            ("X-Tag", "a"),
            ("X-Kept", "own"),
        ];
        // On Pingora's header (with its map of names' case) and on a plain map alike.
        let mut header = ResponseHeader::build(200, None).expect("header");
        let mut map = http::HeaderMap::new();
        for (name, value) in before {
            header.insert_header(name, value).expect("insert");
            map.append(n(name), HeaderValue::from_static(value));
        }
        rules.apply(&mut header, &vars()).expect("apply");
        rules.apply(&mut map, &vars()).expect("apply");
        // Pingora's header keeps the case the peer sent for the headers it had.
        let mut wire = Vec::new();
        header.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8_lossy(&wire);
        assert!(
            wire.contains("X-Tag: a") && wire.contains("X-Kept: own"),
            "{wire}"
        );
        for headers in [&header.headers, &map] {
            let all = |name: &str| {
                headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().expect("text").to_owned())
                    .collect::<Vec<_>>()
            };
            assert!(all("x-debug").is_empty());
            assert_eq!(all("x-env"), ["prod"]);
            assert_eq!(all("x-tag"), ["a", "b"]);
            assert_eq!(all("x-frame-options"), ["DENY"]);
            assert_eq!(all("x-kept"), ["own"]);
        }
    }
}
