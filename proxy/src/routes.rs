//! The route table: path prefixes mapped to what serves them. Built once from config;
//! a lookup is a scan of a handful of prefixes, longest first.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The pool of backend processes on Unix sockets.
    Backends,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub target: Target,
}

pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        // Longest prefix first, so `/api/admin/` wins over `/api/`.
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        Self { routes }
    }

    pub fn lookup(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| path.starts_with(&route.prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_unknown_is_none() {
        let table = RouteTable::new(vec![
            Route {
                prefix: "/".into(),
                target: Target::Backends,
            },
            Route {
                prefix: "/api/".into(),
                target: Target::Backends,
            },
        ]);
        assert_eq!(
            table.lookup("/api/ping").map(|r| r.prefix.as_str()),
            Some("/api/")
        );
        assert_eq!(table.lookup("/x").map(|r| r.prefix.as_str()), Some("/"));
        let only_api = RouteTable::new(vec![Route {
            prefix: "/api/".into(),
            target: Target::Backends,
        }]);
        assert!(only_api.lookup("/apix").is_none());
    }
}
