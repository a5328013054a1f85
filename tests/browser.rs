//! Headless Chromium driven over the DevTools protocol, for tests that need a page to run its
//! scripts and be clicked. `--remote-debugging-pipe` speaks the protocol as NUL-separated JSON
//! on file descriptors 3 (commands in) and 4 (answers out), so no websocket is needed.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{FromRawFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::{Value, json};

pub struct Browser {
    child: Child,
    commands: File,
    answers: BufReader<File>,
    next_id: u64,
    /// The session of the one page, once [`Browser::open`] made it.
    session: Option<String>,
    /// Events that arrived while a call waited for its answer.
    events: Vec<String>,
    /// The page's console messages from the browser itself (a blocked load, a Content
    /// Security Policy violation), once [`Browser::open`] asked for them.
    log: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn launch(chromium: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("browser profile");
        let (commands_read, commands_write) = pipe();
        let (answers_read, answers_write) = pipe();
        let mut command = Command::new(chromium);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--ignore-certificate-errors",
                "--remote-debugging-pipe",
                "--window-size=1280,1800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only dup2, async-signal-safe, between fork and exec. The pipe's ends are
        // above 10 (see `pipe`), so neither copy overwrites the other.
        unsafe {
            command.pre_exec(move || {
                for (from, to) in [(commands_read, 3), (answers_write, 4)] {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start chromium");
        // SAFETY: the pipe's ends are ours alone; each becomes one owning File.
        let (commands, answers) = unsafe {
            libc::close(commands_read);
            libc::close(answers_write);
            (
                File::from_raw_fd(commands_write),
                File::from_raw_fd(answers_read),
            )
        };
        Browser {
            child,
            commands,
            answers: BufReader::new(answers),
            next_id: 0,
            session: None,
            events: Vec::new(),
            log: Vec::new(),
            _profile: profile,
        }
    }

    /// Opens `url` in a new page, which later calls act on, and waits for it to load.
    pub fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        self.session = Some(attached["sessionId"].as_str().expect("sessionId").into());
        self.call("Page.enable", json!({}));
        self.call("Log.enable", json!({}));
        self.call("Runtime.enable", json!({}));
        // A page opened before this one has fired its own load event.
        self.events.clear();
        self.call("Page.navigate", json!({"url": url}));
        while !self.events.iter().any(|e| e == "Page.loadEventFired") {
            let message = self.read();
            self.note(&message);
        }
    }

    /// What the browser logged about the page so far, and the page's uncaught exceptions.
    pub fn log(&self) -> &[String] {
        &self.log
    }

    fn note(&mut self, event: &Value) {
        let Some(method) = event["method"].as_str() else {
            return;
        };
        if method == "Log.entryAdded" {
            let entry = &event["params"]["entry"];
            self.log
                .push(format!("{}: {}", entry["level"], entry["text"]));
        }
        if method == "Runtime.exceptionThrown" {
            let details = &event["params"]["exceptionDetails"];
            self.log.push(format!(
                "exception: {} {}",
                details["text"], details["exception"]["description"]
            ));
        }
        self.events.push(method.to_string());
    }

    /// Runs `expression` in the page, waits for the promise it returns, and gives its value.
    /// A thrown error fails the test with its message.
    pub fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("the page threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Types `text` where the focus is, as a keyboard would.
    pub fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({"text": text}));
    }

    /// Presses and releases one key: `Tab`, `Shift+Tab`, `Enter`, `Escape` or `Space`.
    pub fn press(&mut self, key: &str) {
        let (modifiers, key) = match key.strip_prefix("Shift+") {
            Some(key) => (8, key),
            None => (0, key),
        };
        let (name, code, text) = match key {
            "Tab" => ("Tab", 9, ""),
            "Enter" => ("Enter", 13, "\r"),
            "Escape" => ("Escape", 27, ""),
            "Space" => (" ", 32, " "),
            other => panic!("no key {other:?} here"),
        };
        let mut event = json!({
            "type": if text.is_empty() { "rawKeyDown" } else { "keyDown" },
            "key": name,
            "code": key,
            "windowsVirtualKeyCode": code,
            "modifiers": modifiers,
        });
        if !text.is_empty() {
            event["text"] = json!(text);
        }
        self.call("Input.dispatchKeyEvent", event.clone());
        event["type"] = json!("keyUp");
        self.call("Input.dispatchKeyEvent", event);
    }

    /// A PNG of the page's viewport as it is drawn now.
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::{Engine, engine::general_purpose::STANDARD};
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        STANDARD
            .decode(shot["data"].as_str().expect("the screenshot's data"))
            .expect("base64")
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).expect("a command");
        bytes.push(0);
        self.commands.write_all(&bytes).expect("write to chromium");
        loop {
            let answer = self.read();
            if answer["method"].is_string() {
                self.note(&answer);
                continue;
            }
            if answer["id"] != id {
                continue;
            }
            if let Some(error) = answer.get("error") {
                panic!("{method}: {error}");
            }
            return answer["result"].clone();
        }
    }

    /// The next message: an answer or an event.
    fn read(&mut self) -> Value {
        let mut message = Vec::new();
        let read = self
            .answers
            .read_until(0, &mut message)
            .expect("read chromium");
        assert!(read > 0, "chromium closed its pipe");
        message.pop();
        serde_json::from_slice(&message).expect("a JSON message")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's `chromium`, if installed. Without it a test's browser half is skipped, saying
/// `skipped`, unless `GATEHOUSE_REQUIRE_CHROMIUM` is set (CI sets it).
pub fn chromium(skipped: &str) -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser"].into_iter().find(|name| {
        Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("GATEHOUSE_REQUIRE_CHROMIUM").is_none(),
            "GATEHOUSE_REQUIRE_CHROMIUM is set, but chromium is not installed (apt-get install chromium)"
        );
        eprintln!("chromium is not installed: {skipped}");
    }
    found.map(PathBuf::from)
}

/// A pipe whose ends are close-on-exec and numbered above 10.
fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given; each is then moved to
    // a number above 10 and the original closed.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0, "pipe2");
        for fd in &mut fds {
            let high = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
            assert!(high >= 10, "fcntl: {}", std::io::Error::last_os_error());
            libc::close(*fd);
            *fd = high;
        }
    }
    (fds[0], fds[1])
}
