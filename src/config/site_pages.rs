//! A static route's `error_pages` and `fallback`: files that must exist below its
//! `static_dir`, checked at load so a typo stops the start (or the reload) instead of showing
//! up as the built-in page in production.

use std::path::Path;

use gatehouse_proxy::statics::fallback::{PAGE_STATUSES, SitePages};

use super::{
    error::{ConfigError, Source},
    raw::RawRoute,
};

/// Route `i`'s pages; `dir`: its static directory, known to exist.
pub fn route(
    route: &RawRoute,
    i: usize,
    dir: &Path,
    source: &Source,
) -> Result<SitePages, ConfigError> {
    let mut pages = SitePages::default();
    let root = dir.canonicalize().map_err(|e| {
        source.at(
            &format!("routes[{i}].static_dir"),
            format!("{}: {e}", dir.display()),
        )
    })?;
    for (status, name) in route.error_pages.iter().flatten() {
        let key = format!("routes[{i}].error_pages.{status}");
        let code = status
            .parse::<u16>()
            .ok()
            .filter(|code| PAGE_STATUSES.contains(code))
            .ok_or_else(|| {
                source.at(
                    &key,
                    format!(
                        "{status:?}: a route has its own page only for {PAGE_STATUSES:?}; \
                         other errors are the edge's or the backend's"
                    ),
                )
            })?;
        pages
            .errors
            .push((code, inside(&root, name, &key, source)?));
    }
    if let Some(name) = &route.fallback {
        let key = format!("routes[{i}].fallback");
        pages.fallback = Some(inside(&root, name, &key, source)?);
    }
    Ok(pages)
}

/// Backend routes have no directory to take the files from.
pub fn refuse_on_backend(route: &RawRoute, i: usize, source: &Source) -> Result<(), ConfigError> {
    for (field, set) in [
        ("error_pages", route.error_pages.is_some()),
        ("fallback", route.fallback.is_some()),
    ] {
        if set {
            return Err(source.at(
                &format!("routes[{i}].{field}"),
                format!("only static routes take {field}; other routes send no files"),
            ));
        }
    }
    Ok(())
}

/// `name` as a readable file below `root` (canonical), as the path the route's file cache
/// looks it up by. Held to the rules requests are: no way out of the directory (`..`, an
/// absolute path, a symlink pointing out), no dotfile.
fn inside(root: &Path, name: &Path, key: &str, source: &Source) -> Result<String, ConfigError> {
    let path = root.join(name);
    let resolved = path
        .canonicalize()
        .map_err(|e| source.at(key, format!("{}: {e}", path.display())))?;
    let below = resolved.strip_prefix(root).map_err(|_| {
        source.at(
            key,
            format!(
                "{} is outside static_dir {}",
                resolved.display(),
                root.display()
            ),
        )
    })?;
    if below
        .components()
        .any(|c| c.as_os_str().as_encoded_bytes().starts_with(b"."))
    {
        return Err(source.at(
            key,
            format!("{}: dotfiles are never served", name.display()),
        ));
    }
    std::fs::File::open(&resolved)
        .and_then(|file| file.metadata())
        .map_err(|e| source.at(key, format!("{}: {e}", resolved.display())))
        .and_then(|meta| match meta.is_file() {
            true => Ok(()),
            false => Err(source.at(key, format!("{} is not a file", resolved.display()))),
        })?;
    below
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| source.at(key, format!("{}: not UTF-8", name.display())))
}
