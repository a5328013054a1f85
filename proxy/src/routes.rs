//! The route table: path prefixes mapped to what serves them. Built once from config; a
//! lookup is a scan of a handful of prefixes, longest first.

use std::path::PathBuf;

use crate::statics::{Site, StaticSettings};

/// What a route sends requests to, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The pool of backend processes on Unix sockets.
    Backends,
    /// Files under a directory.
    Static {
        dir: PathBuf,
        cache_control: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub target: Target,
}

/// What serves a route at run time.
pub enum Served {
    Backends,
    Static(Site),
}

pub struct RouteTable {
    routes: Vec<(String, Served)>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>, statics: &StaticSettings) -> Result<Self, String> {
        // Longest prefix first, so `/api/admin/` wins over `/api/`.
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        let sites = routes
            .iter()
            .filter(|r| matches!(r.target, Target::Static { .. }))
            .count();
        let routes = routes
            .into_iter()
            .map(|route| {
                let served = match route.target {
                    Target::Backends => Served::Backends,
                    Target::Static { dir, cache_control } => {
                        Served::Static(Site::new(&dir, cache_control, statics, sites)?)
                    }
                };
                Ok((route.prefix, served))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { routes })
    }

    pub fn lookup(&self, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|(prefix, _)| path.starts_with(prefix.as_str()))
    }

    pub fn get(&self, index: usize) -> Option<(&str, &Served)> {
        self.routes
            .get(index)
            .map(|(prefix, served)| (prefix.as_str(), served))
    }

    /// Whether `path` names a static route without its trailing slash (`/open` for `/open/`).
    pub fn is_static_without_slash(&self, path: &str) -> bool {
        self.routes.iter().any(|(prefix, served)| {
            matches!(served, Served::Static(_)) && prefix.strip_suffix('/') == Some(path)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> StaticSettings {
        StaticSettings {
            cache_bytes: 1 << 20,
            max_cached_file_bytes: 1 << 16,
            min_compress_bytes: 256,
        }
    }

    #[test]
    fn longest_prefix_wins_and_unknown_is_none() {
        let dir = std::env::temp_dir();
        let table = RouteTable::new(
            vec![
                Route {
                    prefix: "/".into(),
                    target: Target::Static {
                        dir: dir.clone(),
                        cache_control: None,
                    },
                },
                Route {
                    prefix: "/api/".into(),
                    target: Target::Backends,
                },
                Route {
                    prefix: "/open/".into(),
                    target: Target::Static {
                        dir,
                        cache_control: None,
                    },
                },
            ],
            &settings(),
        )
        .unwrap();
        let prefix = |path| {
            table
                .lookup(path)
                .and_then(|i| table.get(i))
                .map(|(p, _)| p)
        };
        assert_eq!(prefix("/api/ping"), Some("/api/"));
        assert_eq!(prefix("/x"), Some("/"));
        assert!(table.is_static_without_slash("/open"));
        assert!(!table.is_static_without_slash("/api"));
        let only_api = RouteTable::new(
            vec![Route {
                prefix: "/api/".into(),
                target: Target::Backends,
            }],
            &settings(),
        )
        .unwrap();
        assert!(only_api.lookup("/apix").is_none());
    }
}
