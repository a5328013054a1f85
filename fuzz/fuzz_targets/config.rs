//! The config loader (`Config::from_str`) on any text, with a fake environment: the text up
//! to the first NUL byte (which TOML never holds) is the file, the lines after it are
//! `NAME=value` environment variables. Checked: no panic, and a refusal names the file or the
//! environment variable it came from, a line within the text, and a key when it has one.
//!
//! The loader reads the htpasswd files a route names. Inputs naming a path that leaves the
//! scratch tree (absolute, or climbing out with `..`) are skipped, so that no input makes it
//! read `/dev/zero` or a pipe.
#![no_main]

use std::{
    collections::HashMap,
    path::{Component, Path, PathBuf},
    sync::OnceLock,
};

use gatehouse::config::Config;
use libfuzzer_sys::fuzz_target;

/// The config's directory: two levels below the scratch root, so that the shipped configs'
/// `../` and `../../` paths stay inside it.
const DEPTH: usize = 2;

fn config_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let root =
            std::env::temp_dir().join(format!("gatehouse-fuzz-config-{}", std::process::id()));
        let dir = root.join("conf").join("container");
        let htpasswd = "admin:$2y$05$s3hPODKqoBimbCCPfZuF5.FZmWLQPirtLJ5k6xZ5jjTjUGFOof4/O\n\
                        bob:{SHA}sBKkJl3+0/ZJlTnZyV6He0ZjMq0=\n";
        for sub in [
            "static/open",
            "static/close",
            "static/swagger",
            "static/main",
            "secrets",
        ] {
            for base in [&root, &root.join("conf")] {
                std::fs::create_dir_all(base.join(sub)).expect("a scratch directory");
            }
        }
        for file in [
            "htpasswd",
            "secrets/htpasswd",
            "conf/htpasswd",
            "conf/secrets/htpasswd",
        ] {
            std::fs::write(root.join(file), htpasswd).expect("a scratch htpasswd");
        }
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        std::fs::write(dir.join("htpasswd"), htpasswd).expect("a scratch htpasswd");
        dir.join("gatehouse.toml")
    })
}

/// Whether `path`, relative to the config's directory, stays in the scratch tree.
fn stays_inside(path: &str) -> bool {
    let mut depth = DEPTH as isize;
    for component in Path::new(path).components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => depth -= 1,
            Component::RootDir | Component::Prefix(_) => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

fn strings_stay_inside(value: &toml::Value) -> bool {
    match value {
        toml::Value::String(s) => stays_inside(s),
        toml::Value::Array(items) => items.iter().all(strings_stay_inside),
        toml::Value::Table(table) => table.values().all(strings_stay_inside),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let (text, env) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if let Ok(value) = text.parse::<toml::Table>()
        && !value.values().all(strings_stay_inside)
    {
        return;
    }
    let env: HashMap<String, String> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    let file = config_file();
    let lookup = |name: &str| env.get(name).cloned();
    if let Err(error) = Config::from_str(text, file, &lookup) {
        let from_file = error.origin == file.display().to_string();
        let from_env = error
            .origin
            .strip_prefix("environment variable ")
            .is_some_and(|name| env.contains_key(name));
        // A route's htpasswd file is the origin of errors in it.
        let from_scratch = error.origin.contains("gatehouse-fuzz-config-");
        assert!(from_file || from_env || from_scratch, "{error}");
        if from_file && let Some(line) = error.line {
            assert!(
                line >= 1 && line <= text.lines().count().max(1) + 1,
                "{error}"
            );
        }
        if let Some(key) = &error.key {
            assert!(!key.is_empty(), "{error}");
        }
        assert!(!error.message.is_empty(), "{error}");
    }
});
