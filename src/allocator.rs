//! The memory allocator, chosen per process. Every process of the group is this one binary,
//! and what suits the proxy does not suit the backends.
//!
//! Every command uses glibc's allocator unless `GATEHOUSE_ALLOCATOR=mimalloc` is set; then
//! `gatehouse proxy` (which `gatehouse run` starts) uses mimalloc, and the rest still glibc.
//! It is not the default because it keeps more of a burst's memory (below). mimalloc cut
//! the proxy's CPU per proxied request to 0.73-0.84x glibc's, most of it glibc's arena locks
//! (0.94 `futex` calls per `/api/ping` on glibc, 0.02 on mimalloc), and its instructions per
//! request by 6-12% (callgrind). Its peak resident memory under load is glibc's within a
//! few MB, now that a static page's brotli compression no longer zeroes a 4 MiB window's match
//! finder (that was the 60 MB jump once blamed on access logs). mimalloc gives free pages
//! back only while allocating, so a thread here collects every 10 s: 12 s after bursts of a
//! thousand connections the proxy held 43 MB, against 37 MB on glibc (whose free pages the
//! proxy's heap trim gives back) and 60 MB on mimalloc without the collection. Under the whole
//! test suite's load, 600 connections at once left it 15 MB above where it started, against
//! glibc's 12 MB bound (`tests/drills.rs`). A backend spends its time in Redis round trips
//! and argon2, not in the allocator: there mimalloc would only add memory.
//!
//! The choice is made before `main`, from the command line and environment that glibc hands
//! to `.init_array` functions (as Rust's own `std::env::args` relies on), so no block is ever
//! freed by an allocator other than the one that made it.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicU8, Ordering},
};

use mimalloc::MiMalloc;

const SYSTEM: u8 = 0;
const MIMALLOC: u8 = 1;
/// `GATEHOUSE_ALLOCATOR` named neither: the system's allocator, and `main` refuses to start.
const INVALID: u8 = 2;

static CHOSEN: AtomicU8 = AtomicU8::new(SYSTEM);

pub const VARIABLE: &str = "GATEHOUSE_ALLOCATOR";

/// How often the free pages of a proxy on mimalloc are given back (as glibc's are by the
/// proxy's heap trim).
const RETURN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

unsafe extern "C" {
    /// Sets up the calling thread's mimalloc heap, which [`mi_collect`] needs: without one it
    /// returns at once, and a thread gets one only on its first allocation.
    fn mi_thread_init();
    /// mimalloc's collection: it frees the calling thread's retired pages and returns to the
    /// kernel, for the whole process, the arena pages free for longer than mimalloc's purge
    /// delay (1 s). mimalloc does that on its own only while allocating, so a proxy idle after
    /// a burst of connections would keep the burst's memory. `force` would also return pages
    /// freed a moment ago, which a busy proxy then faults back in.
    fn mi_collect(force: bool);
}

/// Whether this process allocates with mimalloc.
pub fn on_mimalloc() -> bool {
    PerProcess::mimalloc()
}

/// In a process on mimalloc, starts a thread that gives its free pages back every
/// [`RETURN_EVERY`]; elsewhere does nothing. Pages still held by the worker threads' heaps
/// stay until those threads collect them.
pub fn start_returning_free_pages() {
    if !on_mimalloc() {
        return;
    }
    let started = std::thread::Builder::new()
        .name("free pages".into())
        .spawn(|| {
            // SAFETY: mimalloc is this process's allocator; both calls are safe from any
            // thread at any time.
            unsafe { mi_thread_init() };
            loop {
                std::thread::sleep(RETURN_EVERY);
                // SAFETY: as above.
                unsafe { mi_collect(false) };
            }
        });
    // Without it the proxy only keeps more memory after a burst.
    drop(started);
}

/// Whether `GATEHOUSE_ALLOCATOR` held something other than `system` or `mimalloc`.
pub fn invalid_choice() -> bool {
    CHOSEN.load(Ordering::Relaxed) == INVALID
}

pub struct PerProcess;

impl PerProcess {
    fn mimalloc() -> bool {
        CHOSEN.load(Ordering::Relaxed) == MIMALLOC
    }
}

// SAFETY: each call goes to one of two allocators that uphold `GlobalAlloc`'s contract, and
// the choice between them never changes after the first allocation, so a block is always
// resized and freed by the allocator that made it.
unsafe impl GlobalAlloc for PerProcess {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::mimalloc() {
            unsafe { MiMalloc.alloc(layout) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::mimalloc() {
            unsafe { MiMalloc.alloc_zeroed(layout) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if Self::mimalloc() {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        } else {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if Self::mimalloc() {
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod choose {
    use std::ffi::{CStr, c_char, c_int};

    use super::{CHOSEN, INVALID, MIMALLOC, Ordering, SYSTEM, VARIABLE};

    /// Runs before `main` and before any allocation of Rust code.
    #[used]
    #[unsafe(link_section = ".init_array")]
    static CHOOSE: extern "C" fn(c_int, *const *const c_char, *const *const c_char) = choose;

    extern "C" fn choose(argc: c_int, argv: *const *const c_char, env: *const *const c_char) {
        // SAFETY: glibc passes the process's `argc` and `argv`, and `environ`: arrays of C
        // strings, `argv` with `argc` entries and `environ` ending with a null pointer.
        let (command, forced) = unsafe {
            let command = (argc >= 2 && !argv.is_null() && !(*argv.add(1)).is_null())
                .then(|| CStr::from_ptr(*argv.add(1)).to_bytes());
            (command, variable(env))
        };
        let chosen = match forced {
            None | Some(b"system") => SYSTEM,
            Some(b"mimalloc") if command == Some(b"proxy") => MIMALLOC,
            Some(b"mimalloc") => SYSTEM,
            Some(_) => INVALID,
        };
        if chosen == MIMALLOC {
            // mimalloc asks for transparent huge pages on its arenas; each one touched then
            // costs 2 MB of resident memory, which doubled the proxy's (26 to 57 MB under
            // load) for no measurable gain. Turned off for this process only.
            // SAFETY: a plain prctl on this process, with no pointers.
            unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        }
        CHOSEN.store(chosen, Ordering::Relaxed);
    }

    /// The value of `GATEHOUSE_ALLOCATOR` in `env`, read without allocating.
    ///
    /// # Safety
    /// `env` is null or a null-terminated array of C strings.
    unsafe fn variable<'a>(env: *const *const c_char) -> Option<&'a [u8]> {
        if env.is_null() {
            return None;
        }
        let mut at = env;
        loop {
            // SAFETY: within the array, which ends with a null entry.
            let entry = unsafe { *at };
            if entry.is_null() {
                return None;
            }
            // SAFETY: each entry is a C string.
            let text = unsafe { CStr::from_ptr(entry) }.to_bytes();
            if let Some(value) = text
                .strip_prefix(VARIABLE.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
            {
                return Some(value);
            }
            // SAFETY: not past the null entry, checked above.
            at = unsafe { at.add(1) };
        }
    }
}
