//! Files, read once per version and held in a bounded in-memory cache.
//!
//! A cached file is compared with the disk (one `stat`) at most once per check interval: when
//! size, modification time and inode still match, the bytes (and any compressed variant) come
//! from memory; when not, the file is read again, so an edit on disk is served within the
//! interval. (A `stat` per request cost 15% of the static throughput.) Compressed variants
//! are made at most once per version: taken from a fresh `.gz`/`.br` file beside the original
//! when there is one, otherwise compressed on first use.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        Arc, LazyLock, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use quick_cache::{Weighter, sync::Cache};

use crate::{
    encoding::{Encoding, compressible},
    error::BuildError,
};

pub struct Asset {
    /// Where the file really is, inside the root.
    pub path: PathBuf,
    pub len: u64,
    modified: SystemTime,
    inode: u64,
    pub mime: &'static str,
    pub compressible: bool,
    pub last_modified: String,
    /// One ETag per encoding, indexed by [`Encoding::index`].
    etags: [String; 4],
    /// The file's own bytes; `None` for files too large to hold, which are streamed from disk.
    pub identity: Option<Bytes>,
    /// Whether the cache holds it (so a compressed variant is made once, not per request).
    pub held: bool,
    /// The compressed variants, each made once, by [`Encoding::index`] less one (identity
    /// has none).
    variants: [OnceLock<Option<Bytes>>; COMPRESSED],
    /// When the file was last found unchanged on disk, by [`now_ms`].
    checked: AtomicU64,
}

impl Asset {
    fn load(path: PathBuf, meta: &fs::Metadata, max_cached: u64) -> io::Result<Asset> {
        let mime = mime_guess::from_path(&path)
            .first_raw()
            .unwrap_or("application/octet-stream");
        let modified = meta.modified()?;
        let identity = if meta.len() <= max_cached {
            Some(Bytes::from(fs::read(&path)?))
        } else {
            None
        };
        let len = identity.as_ref().map_or(meta.len(), |b| b.len() as u64);
        // Size and mtime make the validator; the coding keeps each variant's ETag distinct.
        let nanos = modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let etags = Encoding::ALL.map(|e| match e {
            Encoding::Identity => format!("\"{len:x}-{nanos:x}\""),
            other => format!("\"{len:x}-{nanos:x}-{}\"", other.token()),
        });
        Ok(Asset {
            len,
            etags,
            modified,
            inode: meta.ino(),
            mime: with_charset(mime),
            compressible: compressible(mime),
            last_modified: httpdate::fmt_http_date(modified),
            identity,
            held: false,
            variants: Default::default(),
            checked: AtomicU64::new(now_ms()),
            path,
        })
    }

    fn is_current(&self, meta: &fs::Metadata) -> bool {
        meta.len() == self.len
            && meta.ino() == self.inode
            && meta.modified().ok() == Some(self.modified)
    }

    pub fn modified(&self) -> SystemTime {
        self.modified
    }

    pub fn etag(&self, encoding: Encoding) -> &str {
        &self.etags[encoding.index()]
    }

    /// The compressed variant, made once; `None` when it would not be smaller.
    /// Slow the first time: call it off the async threads.
    pub fn variant(&self, encoding: Encoding) -> Option<Bytes> {
        self.cell(encoding)?
            .get_or_init(|| {
                let identity = self.identity.as_ref()?;
                let compressed = self
                    .sidecar(encoding)
                    .or_else(|| encoding.compress(identity))?;
                (compressed.len() < identity.len()).then_some(compressed)
            })
            .clone()
    }

    pub fn variant_ready(&self, encoding: Encoding) -> bool {
        self.cell(encoding).is_none_or(|cell| cell.get().is_some())
    }

    /// Where `encoding`'s variant is kept; `None` for identity.
    fn cell(&self, encoding: Encoding) -> Option<&OnceLock<Option<Bytes>>> {
        self.variants.get(encoding.index().checked_sub(1)?)
    }

    /// A precompressed file beside the original, if it is at least as new.
    fn sidecar(&self, encoding: Encoding) -> Option<Bytes> {
        let mut name = self.path.clone().into_os_string();
        name.push(".");
        name.push(encoding.sidecar_extension()?);
        let meta = fs::metadata(&name).ok()?;
        if meta.modified().ok()? < self.modified {
            return None;
        }
        fs::read(&name).ok().map(Bytes::from)
    }

    /// What the entry may come to hold, fixed when it is made: the cache requires a weight
    /// that never changes. Variants are kept only when smaller than the file, so together
    /// they stay under as many times its size as there are compressed codings.
    fn weight(&self) -> u64 {
        let bytes = self.identity.as_ref().map_or(0, |b| b.len() as u64);
        let variants = if self.compressible {
            COMPRESSED as u64 * bytes
        } else {
            0
        };
        1024 + bytes + variants
    }
}

/// The codings with a variant: all but identity.
const COMPRESSED: usize = Encoding::ALL.len() - 1;

/// Text types are sent as UTF-8, as nginx's `charset utf-8` would.
fn with_charset(mime: &'static str) -> &'static str {
    match mime {
        "text/html" => "text/html; charset=utf-8",
        "text/css" => "text/css; charset=utf-8",
        "text/plain" => "text/plain; charset=utf-8",
        "text/javascript" | "application/javascript" => "text/javascript; charset=utf-8",
        other => other,
    }
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<String, Arc<Asset>> for ByBytes {
    fn weight(&self, _key: &String, asset: &Arc<Asset>) -> u64 {
        asset.weight()
    }
}

/// What a lookup found.
pub enum Found {
    File(Arc<Asset>),
    /// A directory asked for without its trailing slash.
    Directory,
    Missing,
    /// Resolves outside the root or to a dotfile: answered as missing, but never with the
    /// route's fallback file.
    Refused,
}

/// One static site's files. Cheap to clone: clones share the cache.
#[derive(Clone)]
pub struct Files(Arc<Inner>);

struct Inner {
    root: PathBuf,
    cache: Cache<String, Arc<Asset>, ByBytes>,
    capacity: u64,
    max_cached_file: u64,
    check_interval_ms: u64,
}

/// Milliseconds on a monotonic clock, from the first call.
fn now_ms() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Files {
    /// `root` must be canonical: it is what resolved paths are checked against.
    pub fn new(
        root: PathBuf,
        capacity: u64,
        max_cached_file: u64,
        check_interval: Duration,
    ) -> Result<Files, BuildError> {
        // One shard: the cache refuses entries heavier than a shard, and a site's largest
        // files must fit whole.
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity((capacity / 16_384).max(16) as usize)
            .weight_capacity(capacity)
            .shards(1)
            .build()
            .map_err(|e| BuildError::StaticCache(format!("{e:?}")))?;
        let cache = Cache::with_options(options, ByBytes, Default::default(), Default::default());
        Ok(Files(Arc::new(Inner {
            root,
            cache,
            capacity,
            max_cached_file,
            check_interval_ms: u64::try_from(check_interval.as_millis()).unwrap_or(u64::MAX),
        })))
    }

    /// A cached file that has not changed on disk, as of the last check interval.
    pub fn cached(&self, relative: &str) -> Option<Arc<Asset>> {
        let asset = self.0.cache.get(relative)?;
        let now = now_ms();
        if now.saturating_sub(asset.checked.load(Ordering::Relaxed)) < self.0.check_interval_ms {
            return Some(asset);
        }
        match fs::metadata(&asset.path) {
            Ok(meta) if asset.is_current(&meta) => {
                asset.checked.store(now, Ordering::Relaxed);
                Some(asset)
            }
            _ => {
                self.0.cache.remove(relative);
                None
            }
        }
    }

    /// Resolves and reads `relative` below the root. Blocking: call it off the async threads.
    pub fn load(&self, relative: &str) -> Found {
        let inner = &self.0;
        // Resolve symlinks; refuse anything outside the root, or a dotfile it points to.
        let Ok(path) = inner.root.join(relative).canonicalize() else {
            return Found::Missing;
        };
        let Ok(inside) = path.strip_prefix(&inner.root) else {
            return Found::Refused;
        };
        if inside
            .components()
            .any(|c| c.as_os_str().as_encoded_bytes().starts_with(b"."))
        {
            return Found::Refused;
        }
        let Ok(meta) = fs::metadata(&path) else {
            return Found::Missing;
        };
        if meta.is_dir() {
            return Found::Directory;
        }
        if !meta.is_file() {
            return Found::Missing;
        }
        match Asset::load(path, &meta, inner.max_cached_file) {
            Ok(mut asset) => {
                // Held in memory only if the cache can take it whole; only then are
                // compressed variants made (once), never for a file that would be re-read.
                asset.held = asset.identity.is_some() && asset.weight() <= inner.capacity / 10 * 9;
                let asset = Arc::new(asset);
                if asset.held {
                    inner.cache.insert(relative.to_string(), asset.clone());
                }
                Found::File(asset)
            }
            Err(_) => Found::Missing,
        }
    }
}
