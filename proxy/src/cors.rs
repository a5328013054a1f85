//! CORS for a route, answered at the edge: preflights (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`) get 204 with what the route allows, or 403 when the
//! origin, method or headers are not allowed; every other response of the route names the
//! allowed origin. The route's `Access-Control-*` response headers are the edge's alone: a
//! backend's own are dropped, or one reflecting `Origin` would undo the origins list.
//! Everything sent is made when the config is loaded.

use http::{HeaderName, HeaderValue, Method, header};
use pingora::{
    Result,
    http::{RequestHeader, ResponseHeader},
};

use crate::header_rules::HeaderEdit;

/// Which origins may read the route's responses.
#[derive(Debug, Clone)]
pub enum Origins {
    /// `*`: any origin, never with credentials.
    Any,
    /// Serialized origins (`https://a.example:8443`), in lower case as browsers send them.
    List(Vec<HeaderValue>),
}

/// Request headers a preflight may ask for.
#[derive(Debug, Clone)]
pub enum AllowedHeaders {
    /// `*`: any but `Authorization`, which the Fetch standard never lets a wildcard cover.
    Any,
    List(Vec<HeaderName>),
}

#[derive(Debug, Clone)]
pub struct Cors {
    origins: Origins,
    methods: Vec<Method>,
    headers: AllowedHeaders,
    credentials: bool,
    /// The preflight answer's own headers.
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
}

/// The serialized origin `value` names (`scheme://host[:port]`, lower case), or why not.
pub fn origin(value: &str) -> Result<HeaderValue, String> {
    let lower = value.to_ascii_lowercase();
    let valid = lower.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    });
    if !valid {
        return Err(format!(
            "{value:?} is not an origin like \"https://app.example\" (scheme and host, an optional \
             port, no path)"
        ));
    }
    // Browsers send the port only when it is not the scheme's own, without leading zeros: any
    // other spelling would never equal an `Origin` they send.
    let (scheme, rest) = lower.split_once("://").unwrap_or_default();
    if let Some((_, port)) = rest
        .rsplit_once(':')
        .filter(|(_, port)| !port.contains(']'))
    {
        let number = port.parse::<u16>().ok().filter(|n| n.to_string() == port);
        let default = if scheme == "https" { 443 } else { 80 };
        match number {
            None => {
                return Err(format!(
                    "{value:?}: the port is not a number from 0 to 65535"
                ));
            }
            Some(n) if n == default => {
                return Err(format!(
                    "{value:?}: {n} is the {scheme} port, which browsers leave out of the \
                     origin; write it without the port"
                ));
            }
            Some(_) => {}
        }
    }
    HeaderValue::from_str(&lower).map_err(|_| format!("{value:?} is not a valid origin"))
}

/// A method as the config names it. Browsers upper-case only the six standard methods in a
/// preflight and send any other as the page wrote it, comparing case-sensitively; so only
/// those six are upper-cased here.
pub fn method(value: &str) -> Result<Method, String> {
    if value == "*" {
        return Err("\"*\" is not a method: list the methods".into());
    }
    const STANDARD: [&str; 6] = ["DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"];
    let name = match STANDARD.iter().find(|m| m.eq_ignore_ascii_case(value)) {
        Some(standard) => standard,
        None => value,
    };
    Method::from_bytes(name.as_bytes()).map_err(|_| format!("{value:?} is not a method"))
}

pub fn header_name(value: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| format!("{value:?} is not a valid header name"))
}

pub struct CorsSpec {
    pub origins: Origins,
    pub methods: Vec<Method>,
    pub headers: AllowedHeaders,
    pub expose_headers: Vec<HeaderName>,
    pub max_age_secs: Option<u64>,
    pub credentials: bool,
}

fn joined<T: AsRef<str>>(items: &[T]) -> Option<HeaderValue> {
    let text = items
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    (!text.is_empty())
        .then(|| HeaderValue::from_str(&text).ok())
        .flatten()
}

/// Why a preflight is refused, for the 403's message.
pub type Refusal = String;

impl Cors {
    pub fn new(spec: CorsSpec) -> Self {
        let methods: Vec<&str> = spec.methods.iter().map(Method::as_str).collect();
        let allow_headers = match &spec.headers {
            AllowedHeaders::Any => Some(HeaderValue::from_static("*")),
            AllowedHeaders::List(list) => joined(list),
        };
        Self {
            allow_methods: joined(&methods).unwrap_or(HeaderValue::from_static("GET, HEAD, POST")),
            allow_headers,
            max_age: spec.max_age_secs.map(HeaderValue::from),
            expose_headers: joined(&spec.expose_headers),
            origins: spec.origins,
            methods: spec.methods,
            headers: spec.headers,
            credentials: spec.credentials,
        }
    }

    /// Whether `request` is a preflight rather than the request itself.
    pub fn is_preflight(request: &RequestHeader) -> bool {
        request.method == Method::OPTIONS
            && request.headers.contains_key(header::ORIGIN)
            && request
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// The `Access-Control-Allow-Origin` for this request: `*` on every request when any
    /// origin is allowed (the same answer for all, so caches need no `Vary`); otherwise the
    /// request's origin if listed, else `None`.
    pub fn allow_origin(&self, request: &RequestHeader) -> Option<HeaderValue> {
        match &self.origins {
            Origins::Any => Some(HeaderValue::from_static("*")),
            Origins::List(list) => {
                let origin = request.headers.get(header::ORIGIN)?;
                list.iter().find(|o| *o == origin).cloned()
            }
        }
    }

    /// The preflight's 204 header (without the origin, which [`Cors::apply`] adds), or why it
    /// is refused. `allowed`: [`Cors::allow_origin`] of the request.
    pub fn preflight(
        &self,
        request: &RequestHeader,
        allowed: Option<&HeaderValue>,
    ) -> Result<std::result::Result<ResponseHeader, Refusal>> {
        if allowed.is_none() {
            return Ok(Err("this origin may not use this resource".into()));
        }
        let method = request
            .headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
        // GET, HEAD and POST never need the server's leave (the Fetch standard's
        // CORS-safelisted methods), so they are allowed whatever the list says.
        let method_allowed = method.as_ref().is_some_and(|m| {
            matches!(*m, Method::GET | Method::HEAD | Method::POST) || self.methods.contains(m)
        });
        if !method_allowed {
            return Ok(Err("this method is not allowed from other origins".into()));
        }
        let asked = request
            .headers
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|name| !name.is_empty());
        for name in asked {
            let allowed = match &self.headers {
                AllowedHeaders::Any => !name.eq_ignore_ascii_case(b"authorization"),
                AllowedHeaders::List(list) => list
                    .iter()
                    .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name)),
            };
            if !allowed {
                return Ok(Err(format!(
                    "the request header {:?} is not allowed from other origins",
                    String::from_utf8_lossy(name)
                )));
            }
        }
        let mut answer = ResponseHeader::build(204, Some(6))?;
        answer.insert_header(header::ACCESS_CONTROL_ALLOW_METHODS, &self.allow_methods)?;
        if let Some(headers) = &self.allow_headers {
            answer.insert_header(header::ACCESS_CONTROL_ALLOW_HEADERS, headers)?;
        }
        if let Some(max_age) = &self.max_age {
            answer.insert_header(header::ACCESS_CONTROL_MAX_AGE, max_age)?;
        }
        Ok(Ok(answer))
    }

    /// Drops a backend response's own `Access-Control-*` headers, before [`Cors::apply`].
    pub fn remove_backends(headers: &mut impl HeaderEdit) {
        let backends: Vec<HeaderName> = headers
            .map()
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in &backends {
            headers.drop_all(name);
        }
    }

    /// The CORS headers of any response of the route (preflights included). `allowed`:
    /// [`Cors::allow_origin`] of the request.
    pub fn apply(
        &self,
        response: &mut impl HeaderEdit,
        allowed: Option<&HeaderValue>,
    ) -> Result<()> {
        // With a list the answer depends on the request's `Origin`: a cache must keep one copy
        // per origin, including the one for requests without it.
        if let Origins::List(_) = self.origins {
            response.add(&header::VARY, HeaderValue::from_static("Origin"))?;
        }
        let Some(origin) = allowed else {
            return Ok(());
        };
        response.put(&header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())?;
        if self.credentials {
            let yes = HeaderValue::from_static("true");
            response.put(&header::ACCESS_CONTROL_ALLOW_CREDENTIALS, yes)?;
        }
        if let Some(expose) = &self.expose_headers {
            response.put(&header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: Origins, headers: AllowedHeaders) -> Cors {
        Cors::new(CorsSpec {
            origins,
            methods: vec![Method::GET, Method::PUT],
            headers,
            expose_headers: vec![],
            max_age_secs: Some(600),
            credentials: false,
        })
    }

    fn preflight(origin: &str, method: &str, headers: Option<&str>) -> RequestHeader {
        let mut request = RequestHeader::build("OPTIONS", b"/api/x", None).expect("request");
        request.insert_header("origin", origin).expect("origin");
        request
            .insert_header("access-control-request-method", method)
            .expect("method");
        if let Some(headers) = headers {
            request
                .insert_header("access-control-request-headers", headers)
                .expect("headers");
        }
        request
    }

    #[test]
    fn origins_are_checked_at_load() {
        assert_eq!(
            origin("HTTPS://App.Example:8443").expect("valid"),
            "https://app.example:8443"
        );
        for bad in [
            "app.example",
            "https://a.example/",
            "ftp://a",
            "https://",
            "null",
            "https://a.example:443",
            "http://a.example:80",
            "https://a.example:",
            "https://a.example:0443",
            "https://a.example:65536",
        ] {
            assert!(origin(bad).is_err(), "{bad}");
        }
        assert!(origin("http://a.example:443").is_ok());
        assert!(origin("https://[::1]:8443").is_ok());
        assert!(origin("https://[::1]").is_ok());
    }

    #[test]
    fn only_the_standard_methods_are_upper_cased() {
        assert_eq!(method("delete").expect("valid"), Method::DELETE);
        assert_eq!(method("patch").expect("valid").as_str(), "patch");
        assert_eq!(method("PATCH").expect("valid").as_str(), "PATCH");
        assert!(method("*").is_err());
    }

    #[test]
    fn a_backends_own_cors_headers_are_replaced() {
        let list = Origins::List(vec![HeaderValue::from_static("https://a.example")]);
        let rules = cors(list, AllowedHeaders::Any);
        for allowed in [None, Some(HeaderValue::from_static("https://a.example"))] {
            // A backend's response, as the proxy edits it: its header map.
            let mut headers = http::HeaderMap::new();
            for (name, value) in [
                ("access-control-allow-origin", "https://evil.example"),
                ("access-control-allow-credentials", "true"),
                ("access-control-expose-headers", "x-secret"),
            ] {
                headers.insert(name, HeaderValue::from_static(value));
            }
            Cors::remove_backends(&mut headers);
            rules.apply(&mut headers, allowed.as_ref()).expect("apply");
            assert_eq!(headers.get("access-control-allow-origin"), allowed.as_ref());
            assert!(!headers.contains_key("access-control-allow-credentials"));
            assert!(!headers.contains_key("access-control-expose-headers"));
        }
    }

    #[test]
    fn preflights_are_allowed_or_refused() {
        let list = Origins::List(vec![HeaderValue::from_static("https://a.example")]);
        let rules = cors(
            list,
            AllowedHeaders::List(vec![HeaderName::from_static("x-token")]),
        );
        let check = |request: &RequestHeader| {
            let allowed = rules.allow_origin(request);
            rules
                .preflight(request, allowed.as_ref())
                .expect("header")
                .is_ok()
        };
        assert!(check(&preflight(
            "https://a.example",
            "PUT",
            Some("X-Token")
        )));
        assert!(check(&preflight("https://a.example", "POST", None)));
        assert!(!check(&preflight("https://b.example", "PUT", None)));
        assert!(!check(&preflight("https://a.example", "DELETE", None)));
        assert!(!check(&preflight(
            "https://a.example",
            "PUT",
            Some("x-token, x-other")
        )));
        let any = cors(Origins::Any, AllowedHeaders::Any);
        let request = preflight("https://z.example", "GET", Some("x-anything"));
        let allowed = any.allow_origin(&request);
        assert_eq!(allowed.as_ref().map(|v| v.as_bytes()), Some(&b"*"[..]));
        assert!(
            any.preflight(&request, allowed.as_ref())
                .expect("header")
                .is_ok()
        );
        let request = preflight("https://z.example", "GET", Some("authorization"));
        assert!(
            any.preflight(&request, allowed.as_ref())
                .expect("header")
                .is_err()
        );
    }
}
