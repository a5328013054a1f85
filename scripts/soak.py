#!/usr/bin/env python3
"""Soak gatehouse: mixed load for a long time, with faults on a schedule, and memory watched.

One run starts `gatehouse run` (a release build) in a temporary directory with its own config
(small limits, so that the faults reach them), its managed redis-server and N backends. Client
threads send a steady mix for `--duration`: static files (identity and gzip), `/api/ping`,
`/api/count` and `/api/me` with bearer tokens, login + `/api/me` + logout, and basic-auth
pages, over HTTP/1.1 keep-alive and HTTPS. Meanwhile faults come on a schedule: a backend
killed (SIGKILL), a backend stopped (SIGSTOP, then SIGCONT), Redis killed (the supervisor
restarts it), a reload, a binary upgrade, slowloris clients, stalled HTTP/2 clients (a zero
flow-control window, streams never read), and a flood of connections from many loopback
addresses. Every few seconds the RSS of each process of the group is sampled.

At the end it prints tables (requests by kind and outcome, the fault timeline with what each
fault cost the ordinary clients, memory over time) and writes them with a JSON summary to
`--out`. It exits 1 if:

- memory grew after warm-up: the group's total RSS, or one process's (by role: supervisor,
  proxy, each backend, redis; by more than 2 MB as well, so a small process's page or two is
  not a leak), is more than `--max-growth` percent above its value at the end of warm-up.
  Warm-up is the first 20% of the run, and at least 30 s (at most half the run). It holds
  one round of every fault, so that caches, pools and what the allocator keeps of the
  attackers' connections settle in it; the rounds after it show whether memory grows round
  after round (a leak) or not. Values are medians of up to five samples (a backend holds
  argon2's 19 MB for a moment during each login): the first samples from warm-up's end that
  fall outside any fault window, against the last ones, from the run's quiet tail (the last
  10%, at least 15 s, in which no fault starts);
- ordinary clients' requests failed outside the fault windows more often than
  `--max-failure-pct` percent of the requests sent outside them. A fault window runs from
  a fault's start to its end plus a grace for its expected effects (a killed backend's 502s,
  Redis's 503s, a stopped backend's 504s); failures inside are reported with their window,
  never hidden, but are not counted against the run;
- the group died: the supervisor exited, a process of the group is missing at the end, or
  the final checks (ping, a counted visit with a token) fail.

    scripts/soak.py --duration 20m            # the long run
    scripts/soak.py --duration 60s --no-build # a short one, as CI does
    scripts/soak.py --binary PATH --out DIR   # another binary; where the tables go

Ordinary clients connect from 127.0.0.1; the attackers from addresses of their own
(127.0.0.2 and up), as they would come from elsewhere. Everything runs on loopback, stops by
itself, signals only the group it started and its children (by pid, never by name) and
removes its temporary directory. A client resends a request once when a kept-alive
connection turns out closed before any answer (as browsers and HTTP libraries do); the
report counts those resends.
"""

import argparse
import base64
import http.client
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
from bench import REPO, SECRET, children, cmdline, free_port, gatehouse_config, wait_for  # noqa: E402

USER, PASSWORD = "admin", "password"  # conf/users
BASIC = "Basic " + base64.b64encode(b"admin:homework").decode()  # conf/htpasswd
CLIENT_TIMEOUT = 10.0
# Settings the faults are measured against (written into the config below).
UPSTREAM_READ_TIMEOUT_S = 3
HEADER_TIMEOUT_MS = 4000
SEND_TIMEOUT_MS = 4000
# Static files of the mix, weighted by repetition (the Swagger stylesheet is large: rarely).
STATIC_PATHS = ["/", "/style.css", "/logo.svg", "/favicon.svg", "/", "/style.css", "/logo.svg",
                "/swagger/swagger-ui.css"]


def parse_duration(text):
    units = {"s": 1, "m": 60, "h": 3600}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def config_text(work, ports, backends, cache_control):
    """Small limits where a fault should reach them; `cache_control` of `/` is what a reload
    changes (so that it can be seen to apply)."""
    limits = f"""header_timeout = "{HEADER_TIMEOUT_MS}ms"
send_timeout = "{SEND_TIMEOUT_MS}ms"
max_connections = 1024
max_connections_per_client = 64"""
    sections = f"""
[upstream]
read_timeout = "{UPSTREAM_READ_TIMEOUT_S}s"

[static]
# Shared by the five static routes: each one's share holds its files and their compressed
# variants (the Swagger stylesheet's 190 KB too), and little more.
cache_bytes = 4194304

[rate_limits.flood]
per_second = 5
burst = 10

[rate_limits.login]
per_second = 50
burst = 100

[redis]
timeout = "500ms"
"""
    # The flood's route has its own policy; its wrong passwords: a few cost a hash, then its
    # name is refused without one.
    access = """rate_limit_max_keys = 1000
auth_guard_max_keys = 1000
auth_max_failures = 5
auth_max_failures_per_user = 20"""
    routes = f"""
[[routes]]
prefix = "/auth/login"
upstream = "backends"
rate_limit = "login"

# Basic auth from anywhere: the flood's wrong passwords fill the brute-force guard.
[[routes]]
prefix = "/vault/"
static_dir = "{work}/static/close"
htpasswd = "{REPO}/conf/htpasswd"

# Only the flood comes here: one rate-limit bucket per address.
[[routes]]
prefix = "/open/"
static_dir = "{work}/static/open"
rate_limit = "flood"

[[routes]]
prefix = "/swagger/"
static_dir = "{work}/static/swagger"
"""
    return gatehouse_config(
        work, ports["http"], ports["https"], backends, admin=ports["admin"],
        access_log=f"{work}/log/access.log", limits=limits, access_extra=access, sections=sections,
        routes=routes, root_extra=f'cache_control = "{cache_control}"')


# ---------------------------------------------------------------------------------------------
# Outcomes


class Stats:
    """Ordinary clients' outcomes: counts by (kind, cause), failures with their times, and
    requests per second (to count those sent outside fault windows)."""

    def __init__(self, t0):
        self.t0 = t0
        self.lock = threading.Lock()
        self.counts = Counter()
        self.failures = []  # (start, end, kind, cause), seconds since t0
        self.per_second = Counter()
        self.stale_retries = Counter()

    def record(self, kind, cause, start, end):
        with self.lock:
            self.counts[(kind, cause)] += 1
            self.per_second[int(start - self.t0)] += 1
            if cause != "ok":
                self.failures.append((start - self.t0, end - self.t0, kind, cause))


def cause_of(error):
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, BrokenPipeError):
        return "broken pipe"
    if isinstance(error, http.client.RemoteDisconnected):
        return "closed without response"
    if isinstance(error, http.client.IncompleteRead):
        return "truncated body"
    if isinstance(error, ssl.SSLError):
        return f"TLS error ({error.reason or type(error).__name__})"
    if isinstance(error, http.client.HTTPException):
        return f"bad response ({type(error).__name__})"
    if isinstance(error, OSError):
        return f"os error ({error.errno})"
    return type(error).__name__


def stale(error):
    """A keep-alive connection the server closed between requests (an upgrade's old proxy, an
    idle connection closed at the connection limit): nothing was answered, so clients resend,
    as browsers and HTTP libraries do."""
    return isinstance(error, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))


class Client:
    """One keep-alive connection (HTTP or HTTPS) from 127.0.0.1."""

    def __init__(self, scheme, ports, stats):
        self.scheme, self.ports, self.stats = scheme, ports, stats
        self.conn = None
        self.used = 0

    def _connect(self):
        if self.scheme == "https":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            self.conn = http.client.HTTPSConnection("127.0.0.1", self.ports["https"], timeout=CLIENT_TIMEOUT,
                                                    context=ctx)
        else:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.ports["http"], timeout=CLIENT_TIMEOUT)
        self.used = 0

    def close(self):
        if self.conn:
            self.conn.close()
        self.conn = None

    def send(self, method, path, headers, body=None):
        """Returns (response, body bytes); raises what the connection raised."""
        for attempt in (0, 1):
            if self.conn is None:
                self._connect()
            reused = self.used > 0
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                self.used += 1
                if response.will_close:
                    self.close()
                return response, data
            except Exception as error:
                self.close()
                if attempt == 0 and reused and stale(error):
                    with self.stats.lock:
                        self.stats.stale_retries[type(error).__name__] += 1
                    continue
                raise
        raise AssertionError("unreachable")

    def call(self, kind, method, path, expect, headers=None, body=None, check=None):
        """Sends one request and records its outcome under `kind`; returns the body when the
        status was `expect` (and `check` passed), else None."""
        headers = dict(headers or {})
        label = f"{kind} [{self.scheme}]"
        start = time.time()
        try:
            response, data = self.send(method, path, headers, body)
        except Exception as error:
            self.stats.record(label, cause_of(error), start, time.time())
            return None
        cause = "ok" if response.status == expect else f"HTTP {response.status}"
        if cause == "ok" and check:
            cause = check(response, data) or "ok"
        self.stats.record(label, cause, start, time.time())
        return data if cause == "ok" else None


def gzip_check(path):
    def check(response, _data):
        if response.getheader("content-encoding") != "gzip":
            return f"{path} not gzip"
        return None
    return check


def login(client):
    body = json.dumps({"username": USER, "password": PASSWORD}).encode()
    data = client.call("login", "POST", "/auth/login", 200, {"Content-Type": "application/json"}, body)
    if data is None:
        return None
    try:
        return json.loads(data)["token"]
    except (ValueError, KeyError):
        return None


def load_worker(index, scheme, ports, stats, stop, interval, token):
    """A steady mix on one keep-alive connection; `interval` seconds between requests
    (0: as fast as the server answers). The clients share one token: logins made all at once
    from one address would meet the login guard, which charges each attempt before it checks
    the password."""
    client = Client(scheme, ports, stats)
    rng = random.Random(index)
    bearer = {"Authorization": f"Bearer {token}"}
    step = 0
    next_at = time.time()
    while not stop.is_set():
        choice = step % 8
        step += 1
        path = STATIC_PATHS[rng.randrange(len(STATIC_PATHS))]
        if choice in (0, 1):
            client.call("static, identity", "GET", path, 200)
        elif choice in (2, 3):
            client.call("static, gzip", "GET", path, 200, {"Accept-Encoding": "gzip"}, check=gzip_check(path))
        elif choice == 4:
            client.call("GET /api/ping", "GET", "/api/ping", 200)
        elif choice == 5:
            client.call("GET /api/count (bearer)", "GET", "/api/count", 200, bearer)
        elif choice == 6:
            client.call("GET /api/me (bearer)", "GET", "/api/me", 200, bearer)
        else:
            client.call("GET /close/ (basic auth)", "GET", "/close/", 200, {"Authorization": BASIC})
        if interval:
            next_at += interval
            delay = next_at - time.time()
            if delay > 0:
                stop.wait(delay)
            else:
                next_at = time.time()
    client.close()


def login_worker(ports, stats, stop, interval):
    """Sign-ins, each followed by /api/me with the new token and a logout, HTTP and HTTPS in
    turn (each token is revoked at once, so live tokens stay far below the per-user cap)."""
    clients = [Client("http", ports, stats), Client("https", ports, stats)]
    turn = 0
    while not stop.is_set():
        client = clients[turn % 2]
        turn += 1
        token = login(client)
        if token:
            bearer = {"Authorization": f"Bearer {token}"}
            client.call("GET /api/me (bearer)", "GET", "/api/me", 200, bearer)
            client.call("logout", "POST", "/auth/logout", 204, bearer)
        stop.wait(interval)
    for client in clients:
        client.close()


# ---------------------------------------------------------------------------------------------
# The group


class Group:
    def __init__(self, binary, work, ports, backends):
        self.binary, self.work, self.ports, self.backends = binary, work, ports, backends
        self.config = work / "gatehouse.toml"
        self.cache_control = "public, no-cache"
        self.proc = None
        self.log_file = None

    def write_config(self):
        self.config.write_text(config_text(self.work, self.ports, self.backends, self.cache_control))

    def start(self):
        self.write_config()
        subprocess.run([self.binary, "cert", "--config", self.config], check=True, capture_output=True)
        # The supervisor's info lines say when an upgrade is done.
        env = dict(os.environ, GATEHOUSE_JWT_SECRET=SECRET, RUST_LOG="warn,gatehouse::supervisor=info")
        self.log_file = open(self.work / "gatehouse.log", "w")
        self.proc = subprocess.Popen([self.binary, "run", "--config", self.config], env=env,
                                     stdout=self.log_file, stderr=self.log_file)
        wait_for(f"http://127.0.0.1:{self.ports['http']}/api/ping", self.work / "gatehouse.log")

    def log_count(self, text):
        try:
            return (self.work / "gatehouse.log").read_text(errors="replace").count(text)
        except OSError:
            return 0

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def members(self):
        """{pid: role} of the supervisor and every process below it."""
        found = {self.proc.pid: "supervisor"}
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                kids = children(pid)
            except OSError:
                continue
            for kid in kids:
                found[kid] = role_of(kid)
                todo.append(kid)
        return found

    def pids(self, role):
        return [pid for pid, r in self.members().items() if r == role]

    def command(self, verb):
        done = subprocess.run([self.binary, verb, "--config", self.config], capture_output=True, text=True)
        return done.returncode, (done.stdout + done.stderr).strip()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log_file:
            self.log_file.close()


def role_of(pid):
    args = cmdline(pid).split()
    if not args:
        return "gone"
    if "redis-server" in args[0]:
        return "redis"
    if len(args) > 1 and args[1] == "proxy":
        return "proxy"
    if len(args) > 1 and args[1] == "backend" and "--id" in args:
        at = args.index("--id")
        return f"backend {args[at + 1]}" if at + 1 < len(args) else "backend"
    return Path(args[0]).name


def status_fields(pid, names=("VmRSS", "RssAnon", "Threads")):
    """Fields of /proc/PID/status as numbers (kB for sizes); missing ones are 0."""
    found = dict.fromkeys(names, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in found:
                found[name] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return found


def sampler(group, t0, every, samples, stop, deaths):
    """Every `every` seconds: RSS (kB) per role (summed when two processes share one, as the
    old and new proxy do during an upgrade), its anonymous part (heap and stacks, without the
    binary's pages) and thread count, and whether the supervisor still runs."""
    while not stop.is_set():
        now = time.time() - t0
        if not group.alive():
            deaths.append((now, f"the supervisor exited with {group.proc.returncode}"))
            return
        by_role, anon, threads = defaultdict(int), defaultdict(int), defaultdict(int)
        pids = defaultdict(list)
        for pid, role in group.members().items():
            if role == "gone":  # exited between the listing and now
                continue
            fields = status_fields(pid)
            by_role[role] += fields["VmRSS"]
            anon[role] += fields["RssAnon"]
            threads[role] += fields["Threads"]
            pids[role].append(pid)
        samples.append({"t": round(now, 1), "rss_kb": dict(by_role), "anon_kb": dict(anon),
                        "threads": dict(threads), "pids": dict(pids)})
        stop.wait(every)


# ---------------------------------------------------------------------------------------------
# Faults. Each returns notes (what it did and saw); the scheduler records its window.


def source_socket(address, port, timeout=5.0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((address, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def wait_until(predicate, timeout, step=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def probe(ports, token, path="/api/count"):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", ports["http"], timeout=3)
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status
    except Exception:
        return None


class Faults:
    def __init__(self, group, ports, token, stop, hold):
        """`hold`: how long the attackers hold on (past the deadlines that cut them)."""
        self.group, self.ports, self.token, self.stop, self.hold = group, ports, token, stop, hold
        self.kills = 0
        self.floods = 0

    def _backend(self):
        backends = sorted(pid for pid, role in self.group.members().items() if role.startswith("backend"))
        if not backends:
            return None, None
        pid = backends[self.kills % len(backends)]
        self.kills += 1
        return pid, role_of(pid)

    def kill_backend(self):
        pid, role = self._backend()
        if pid is None:
            return "no backend found"
        os.kill(pid, signal.SIGKILL)
        back = wait_until(lambda: any(p != pid for p in self.group.pids(role)), 15)
        return f"SIGKILL {role} (pid {pid}); {'restarted' if back else 'NOT restarted within 15 s'}"

    def stop_backend(self, hold=5.0):
        pid, role = self._backend()
        if pid is None:
            return "no backend found"
        os.kill(pid, signal.SIGSTOP)
        self.stop.wait(hold)
        os.kill(pid, signal.SIGCONT)
        return f"SIGSTOP {role} (pid {pid}), SIGCONT after {hold:.0f} s"

    def redis_restart(self):
        pids = self.group.pids("redis")
        if not pids:
            return "no redis-server found"
        started = time.time()
        os.kill(pids[0], signal.SIGKILL)
        back = wait_until(lambda: any(p not in pids for p in self.group.pids("redis")), 15)
        served = wait_until(lambda: probe(self.ports, self.token) == 200, 20)
        took = time.time() - started
        return (f"SIGKILL redis-server (pid {pids[0]}); "
                f"{'restarted' if back else 'NOT restarted'}, /api/count "
                f"{'served again after %.1f s' % took if served else 'NOT served within 20 s'}")

    def reload(self):
        group = self.group
        group.cache_control = ("public, max-age=60" if group.cache_control == "public, no-cache"
                               else "public, no-cache")
        group.write_config()

        def applied():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.ports["http"], timeout=3)
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                conn.close()
                return response.getheader("cache-control") == group.cache_control
            except Exception:
                return False
        # The supervisor refuses a reload while one (or an upgrade) is still in progress.
        for attempt in range(1, 4):
            code, text = group.command("reload")
            if code != 0:
                return f"gatehouse reload exited {code}: {text[-300:]}"
            if wait_until(applied, 10):
                return f"gatehouse reload (Cache-Control of / -> {group.cache_control!r}): applied, attempt {attempt}"
        return f"gatehouse reload (Cache-Control of / -> {group.cache_control!r}): NOT applied in 3 attempts"

    def upgrade(self):
        old = self.group.pids("proxy")
        done_before = self.group.log_count("upgrade done")
        code, text = self.group.command("upgrade")
        if code != 0:
            return f"gatehouse upgrade exited {code}: {text[-300:]}"
        moved = wait_until(lambda: (lambda now: now and not set(now) & set(old))(self.group.pids("proxy")), 60)
        done = wait_until(lambda: self.group.log_count("upgrade done") > done_before, 120)
        return (f"gatehouse upgrade: proxy {old} -> {self.group.pids('proxy')}"
                f"{'' if moved else ' (old proxy NOT gone within 60 s)'}; "
                f"{'done (backends restarted)' if done else 'NOT done within 120 s'}")

    def slowloris(self, addresses=8, per_address=25):
        """Headers a byte every half second, from 127.0.0.2..9; cut ones reconnect."""
        hold = self.hold
        conns = {}
        seen = Counter()

        def open_one(key):
            try:
                sock = source_socket(f"127.0.0.{2 + key[0]}", self.ports["http"])
                sock.sendall(b"GET / HTTP/1.1\r\nHost: soak\r\nUser-Agent: slowloris\r\nX-Slow: ")
                sock.setblocking(False)
                conns[key] = sock
                seen["opened"] += 1
            except OSError as error:
                seen[f"connect: {cause_of(error)}"] += 1

        for a in range(addresses):
            for i in range(per_address):
                open_one((a, i))
        end = time.time() + hold
        while time.time() < end and not self.stop.is_set():
            for key, sock in list(conns.items()):
                outcome = None
                try:
                    data = sock.recv(4096)
                    outcome = (f"answered {data.split(b' ', 2)[1].decode(errors='replace')}"
                               if data.startswith(b"HTTP/") else "closed, no answer")
                except BlockingIOError:
                    try:
                        sock.send(b"a")
                    except BlockingIOError:
                        pass
                    except OSError as error:
                        outcome = f"cut: {cause_of(error)}"
                except OSError as error:
                    outcome = f"cut: {cause_of(error)}"
                if outcome:
                    seen[outcome] += 1
                    sock.close()
                    del conns[key]
                    open_one(key)
            self.stop.wait(0.5)
        for sock in conns.values():
            sock.close()
        return f"slowloris, {addresses * per_address} connections for {hold:.0f} s: {dict(seen)}"

    def h2_stall(self, connections=4, streams=10):
        """TLS with ALPN h2, SETTINGS_INITIAL_WINDOW_SIZE = 0, streams opened and never read
        (half of them /api/ping, which holds a backend slot), from 127.0.0.20..23."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        hold = self.hold
        socks = []
        notes = Counter()
        for c in range(connections):
            try:
                raw = source_socket(f"127.0.0.{20 + c}", self.ports["https"])
                tls = ctx.wrap_socket(raw, server_hostname="localhost")
                if tls.selected_alpn_protocol() != "h2":
                    notes[f"ALPN {tls.selected_alpn_protocol()}"] += 1
                    tls.close()
                    continue
                out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                out += h2_frame(4, 0, 0, struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, 0))
                for s in range(streams):
                    path = "/api/ping" if s % 2 else "/"
                    out += h2_frame(1, 0x5, 2 * s + 1, hpack_get(path, "localhost"))
                tls.sendall(out)
                socks.append(tls)
                notes["connections"] += 1
            except OSError as error:
                notes[f"connect: {cause_of(error)}"] += 1
        self.stop.wait(hold)
        for tls in socks:
            for frame_type in read_h2_frames(tls):
                notes[frame_type] += 1
            tls.close()
        return f"stalled HTTP/2, {connections}x{streams} streams for {hold:.0f} s; frames seen after: {dict(notes)}"

    def address_flood(self, batches=3, batch=500):
        """Connections from many loopback addresses (fresh ones each flood), `batch` held open at
        once. Each asks the rate-limited /open/ (a bucket per address), then /vault/ with the
        right password (answered from the verification cache; the user's few remembered
        addresses churn) and with a wrong one as `flood` (a failure count per address; past
        the name's ceiling, 429 without a hash), so that the maps fill past their caps."""
        self.floods += 1
        seen = Counter()
        first = 1 + ((self.floods - 1) * batches * batch // 250) % 200
        wrong = base64.b64encode(b"flood:wrong").decode()
        n = 0
        for _ in range(batches):
            socks = []
            for _ in range(batch):
                address = f"127.0.{first + n // 250}.{1 + n % 250}"
                n += 1
                try:
                    sock = source_socket(address, self.ports["http"])
                    sock.sendall(b"GET /open/ HTTP/1.1\r\nHost: soak\r\n\r\n")
                    socks.append(sock)
                except OSError as error:
                    seen[f"/open/ {cause_of(error)}"] += 1
            for sock in socks:
                seen["/open/ " + read_status(sock)] += 1
            for sock in socks:
                for label, auth, last in (("right", BASIC, False), ("wrong", f"Basic {wrong}", True)):
                    try:
                        sock.sendall(f"GET /vault/ HTTP/1.1\r\nHost: soak\r\nAuthorization: {auth}\r\n"
                                     f"{'Connection: close' if last else 'X-Flood: 1'}\r\n\r\n".encode())
                        seen[f"/vault/ {label} " + read_status(sock)] += 1
                    except OSError as error:
                        seen[f"/vault/ {label} {cause_of(error)}"] += 1
                sock.close()
            if self.stop.is_set():
                break
        return f"address flood, {n} addresses from 127.0.{first}.1, {batch} open at once: {dict(seen)}"


def read_status(sock):
    """The status of one response on a raw socket (its body is read by Content-Length)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return "closed"
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head.split(b" ", 2)[1].decode()
    except (OSError, ValueError, IndexError) as error:
        return cause_of(error)


def h2_frame(frame_type, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", frame_type, flags, stream) + payload


def hpack_get(path, authority):
    """A GET's header block: :method GET and :scheme https from the static table, :path and
    :authority as literals with indexed names (not added to the table)."""
    def literal(index, value):
        value = value.encode()
        return bytes([index, len(value)]) + value
    return b"\x82\x87" + literal(4, path) + literal(1, authority)


def read_h2_frames(tls):
    """Frame types the server sent (read only now, at the end of the stall)."""
    names = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE"}
    data = b""
    tls.setblocking(False)
    deadline = time.time() + 1
    while time.time() < deadline:
        try:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        except (ssl.SSLWantReadError, BlockingIOError):
            select.select([tls], [], [], 0.1)
        except OSError:
            break
    found = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        found.append(names.get(data[3], f"type {data[3]}"))
        data = data[9 + length:]
    return found


# Grace after a fault's end during which its expected effects may still reach clients.
FAULTS = {
    "upgrade": 5,
    "kill backend": 5,
    "stop backend": UPSTREAM_READ_TIMEOUT_S + 5,
    "restart redis": 3,
    "reload": 5,
    "slowloris": HEADER_TIMEOUT_MS / 1000 + 2,
    "stalled HTTP/2": SEND_TIMEOUT_MS / 1000 + 2,
    "address flood": 3,
}


def schedule(duration, warmup, tail):
    """(start, name). One round of every fault inside warm-up, the upgrade first (so that the
    processes measured after warm-up live to the end, and so that the high-water marks the
    attacks leave, such as freed connection buffers the allocator keeps, are set before the
    baseline); then round after round, one fault every 30 s, from warm-up's end to the quiet
    tail. A leak grows with every round; what the allocator keeps does not."""
    others = [name for name in FAULTS if name != "upgrade"]
    first = warmup / 8
    step = (warmup * 0.85 - first) / len(others)
    plan = [(first, "upgrade")] + [(first + step * (i + 1), name) for i, name in enumerate(others)]
    slots = int((duration - tail - warmup) // 30)
    plan += [(warmup + 15 + 30 * i, others[i % len(others)]) for i in range(slots)]
    return plan


def run_faults(plan, faults, t0, stop, timeline):
    """Each fault in a thread of its own at its time, so that a slow one (an upgrade) never
    delays the next; they may overlap."""
    actions = {
        "upgrade": faults.upgrade,
        "kill backend": faults.kill_backend,
        "stop backend": faults.stop_backend,
        "restart redis": faults.redis_restart,
        "reload": faults.reload,
        "slowloris": faults.slowloris,
        "stalled HTTP/2": faults.h2_stall,
        "address flood": faults.address_flood,
    }

    def apply(name):
        start = time.time() - t0
        try:
            notes = actions[name]()
        except Exception as error:  # a fault that could not be applied is reported, not fatal
            notes = f"failed to apply: {cause_of(error)}: {error}"
        end = time.time() - t0
        timeline.append({"name": name, "start": round(start, 1), "end": round(end, 1),
                         "window_end": round(end + FAULTS[name], 1), "notes": notes})

    running = []
    for at, name in plan:
        if stop.wait(max(0.0, t0 + at - time.time())):
            break
        running.append(threading.Thread(target=apply, args=(name,), daemon=True))
        running[-1].start()
    for thread in running:
        thread.join(timeout=150)


# ---------------------------------------------------------------------------------------------
# Report


def in_window(t0, t1, timeline):
    return [f for f in timeline if t0 <= f["window_end"] and t1 >= f["start"]]


def rss_of(sample, role, field="rss_kb"):
    return sum(sample[field].values()) if role == "total" else sample[field].get(role, 0)


def memory_report(samples, timeline, warmup, max_growth):
    """(rows, failed?, base samples, end samples). A value is the median of a few samples: a
    backend checking a password holds argon2's 19 MB for a moment, which one sample may catch.
    Base: the first quiet samples from warm-up's end; end: the last ones (MEDIAN_OF of each, or
    fewer when a short run has fewer quiet samples)."""
    quiet = [s for s in samples if s["t"] >= warmup and not in_window(s["t"], s["t"], timeline)]
    if len(quiet) < 2:
        # A short run whose faults last to its end: any samples after warm-up.
        quiet = [s for s in samples if s["t"] >= warmup]
    k = max(1, min(MEDIAN_OF, len(quiet) // 2))
    base = quiet[:k]
    end = samples[-k:]
    lines, failed = [], False
    if not base or not end or base[-1]["t"] >= end[0]["t"]:
        return [], True, base, end
    roles = sorted({r for s in base + end for r in s["rss_kb"]}, key=role_order)
    for role in roles + ["total"]:
        a = statistics.median(rss_of(s, role) for s in base)
        b = statistics.median(rss_of(s, role) for s in end)
        anon_a = statistics.median(rss_of(s, role, "anon_kb") for s in base)
        anon_b = statistics.median(rss_of(s, role, "anon_kb") for s in end)
        change = (b - a) / a * 100 if a else float("inf")
        grew = change > max_growth and (role == "total" or b - a > 2048)
        failed |= grew
        lines.append((role, a / 1024, b / 1024, change, grew, anon_a / 1024, anon_b / 1024))
    return lines, failed, base, end


MEDIAN_OF = 5


def role_order(role):
    order = {"supervisor": 0, "proxy": 1, "redis": 9}
    return (order.get(role, 5), role)


def report(opts, stats, timeline, samples, deaths, final, duration, warmup, tail, started):
    timeline.sort(key=lambda f: f["start"])
    out = []
    w = out.append
    total = sum(stats.counts.values())
    ok = sum(n for (kind, cause), n in stats.counts.items() if cause == "ok")
    w(f"`scripts/soak.py --duration {opts.duration}`: {duration:.0f} s of mixed load "
      f"({opts.clients} clients + 1 signing in, target {opts.rps} req/s), {len(timeline)} faults, "
      f"warm-up {warmup:.0f} s, quiet tail {tail:.0f} s, {os.cpu_count()} cores, started {started} UTC.")
    w("")
    w(f"Requests: {total:,}, ok {ok:,} ({ok / max(total, 1) * 100:.3f}%); stale keep-alive connections "
      f"resent once: {sum(stats.stale_retries.values())} {dict(stats.stale_retries)}")
    w("")
    w("| kind | ok | not ok, by cause |")
    w("|---|---|---|")
    kinds = sorted({kind for kind, _ in stats.counts})
    for kind in kinds:
        causes = {cause: n for (k, cause), n in stats.counts.items() if k == kind}
        bad = ", ".join(f"{cause} {n}" for cause, n in sorted(causes.items()) if cause != "ok") or "-"
        w(f"| {kind} | {causes.get('ok', 0):,} | {bad} |")

    # Failures by window.
    outside = []
    per_fault = defaultdict(Counter)
    for start, end, kind, cause in stats.failures:
        hit = in_window(start, end, timeline)
        if not hit:
            outside.append((start, kind, cause))
        for fault in hit:
            per_fault[id(fault)][cause] += 1
    window_seconds = set()
    for fault in timeline:
        window_seconds.update(range(int(fault["start"]), int(fault["window_end"]) + 1))
    sent_outside = sum(n for sec, n in stats.per_second.items() if sec not in window_seconds)
    w("")
    w("Fault timeline (window = start to end + grace for its expected effects; failures are the "
      "ordinary clients' requests that overlapped the window):")
    w("")
    w("| start s | end s | window to s | fault | failures in window | what happened |")
    w("|---|---|---|---|---|---|")
    for fault in timeline:
        f = per_fault[id(fault)]
        bad = ", ".join(f"{c} {n}" for c, n in sorted(f.items())) or "none"
        fault["failures"] = dict(f)
        w(f"| {fault['start']:.0f} | {fault['end']:.0f} | {fault['window_end']:.0f} | {fault['name']} | {bad} | "
          f"{fault['notes']} |")
    rate = len(outside) / max(sent_outside, 1) * 100
    w("")
    w(f"Outside fault windows: {sent_outside:,} requests, {len(outside)} failed ({rate:.4f}%; "
      f"limit {opts.max_failure_pct}%)" + (": " + ", ".join(
          f"{c} {n}" for c, n in Counter(c for _, _, c in outside).most_common()) if outside else "."))
    for start, kind, cause in outside[:20]:
        w(f"- at {start:.1f} s: {kind}: {cause}")

    # Memory.
    lines, mem_failed, base, end = memory_report(samples, timeline, warmup, opts.max_growth)
    roles = sorted({r for s in samples for r in s["rss_kb"]}, key=role_order)
    w("")
    w(f"Memory (RSS MB; every {opts.sample_every:.0f} s, {len(samples)} samples; rows about evenly "
      "spaced, * = inside a fault window):")
    w("")
    w("| t s | " + " | ".join(roles) + " | total | proxy anonymous | proxy threads |")
    w("|---|" + "---|" * (len(roles) + 3))
    rows = samples[:: max(1, len(samples) // 20)]
    for s in sorted({id(s): s for s in rows + base + end}.values(), key=lambda s: s["t"]):
        mark = "*" if in_window(s["t"], s["t"], timeline) else ""
        cells = [f"{s['rss_kb'].get(r, 0) / 1024:.1f}" for r in roles]
        w(f"| {s['t']:.0f}{mark} | " + " | ".join(cells) + f" | {sum(s['rss_kb'].values()) / 1024:.1f} | "
          f"{s['anon_kb'].get('proxy', 0) / 1024:.1f} | {s['threads'].get('proxy', 0)} |")
    if lines:
        w("")
        w(f"Memory after warm-up (medians of {len(base)} samples): {base[0]['t']:.0f}-{base[-1]['t']:.0f} s "
          f"(the first from {warmup:.0f} s outside fault windows) vs {end[0]['t']:.0f}-{end[-1]['t']:.0f} s (the last), "
          f"limit +{opts.max_growth}%:")
        w("")
        w("| process | after warm-up MB | end MB | change | peak MB | anonymous MB, after warm-up -> end | threads at end |")
        w("|---|---|---|---|---|---|---|")
        for role, a, b, change, grew, anon_a, anon_b in lines:
            peak = max(rss_of(s, role) for s in samples) / 1024
            threads = rss_of(end[-1], role, "threads")
            w(f"| {role} | {a:.1f} | {b:.1f} | {change:+.1f}%{' GREW' if grew else ''} | {peak:.1f} | "
              f"{anon_a:.1f} -> {anon_b:.1f} | {threads} |")

    verdicts = []
    if mem_failed and not lines:
        verdicts.append("too few memory samples after warm-up to compare")
    elif mem_failed:
        verdicts.append(f"memory grew more than {opts.max_growth}% after warm-up")
    if rate > opts.max_failure_pct:
        verdicts.append(f"{len(outside)} failures outside fault windows ({rate:.4f}% > {opts.max_failure_pct}%)")
    verdicts += [f"group died at {t:.0f} s: {why}" for t, why in deaths]
    verdicts += [f"final check: {problem}" for problem in final]
    w("")
    w("Result: " + ("PASS" if not verdicts else "FAIL: " + "; ".join(verdicts)))
    text = "\n".join(out) + "\n"
    summary = {
        "duration_s": duration, "warmup_s": warmup, "tail_s": tail, "started_utc": started,
        "clients": opts.clients, "target_rps": opts.rps,
        "requests": {f"{k} | {c}": n for (k, c), n in sorted(stats.counts.items())},
        "stale_retries": dict(stats.stale_retries),
        "outside_windows": {"requests": sent_outside, "failures": len(outside),
                            "failures_list": [{"t": round(t, 2), "kind": k, "cause": c} for t, k, c in outside]},
        "faults": timeline,
        "memory": {"samples": samples, "base_t": [s["t"] for s in base], "end_t": [s["t"] for s in end],
                   "compare": [{"process": r, "base_mb": a, "end_mb": b, "change_pct": ch, "grew": g,
                                "anon_base_mb": aa, "anon_end_mb": ab}
                               for r, a, b, ch, g, aa, ab in lines]},
        "failures": verdicts,
        "pass": not verdicts,
    }
    return text, summary, not verdicts


def final_checks(group, ports, token):
    problems = []
    if not group.alive():
        return [f"the supervisor is not running (exit {group.proc.returncode})"]
    roles = Counter(group.members().values())
    wanted = ["proxy", "redis"] + [f"backend b{i}" for i in range(1, group.backends + 1)]
    problems += [f"no {role} process" for role in wanted if not roles.get(role)]
    if not wait_until(lambda: probe(ports, None, "/api/ping") == 200, 15):
        problems.append("GET /api/ping does not answer 200")
    if not wait_until(lambda: probe(ports, token) == 200, 15):
        problems.append("GET /api/count with a token does not answer 200")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", default="20m", help="how long the load runs: 90s, 20m, 1h (default 20m)")
    parser.add_argument("--binary", type=Path, help="the gatehouse binary (default: build a release)")
    parser.add_argument("--no-build", action="store_true", help="use the existing release binary")
    parser.add_argument("--out", type=Path, default=REPO / "target" / "soak", help="results directory")
    parser.add_argument("--backends", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="ordinary keep-alive clients, half of them HTTPS")
    parser.add_argument("--rps", type=float, default=400,
                        help="ordinary clients' target rate, all together (0: as fast as served)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--max-growth", type=float, default=10.0,
                        help="most RSS growth after warm-up, in percent (default 10)")
    parser.add_argument("--max-failure-pct", type=float, default=0.1,
                        help="most failed requests outside fault windows, in percent (default 0.1)")
    opts = parser.parse_args()

    duration = parse_duration(opts.duration)
    if duration < 30:
        sys.exit("soak: --duration must be at least 30s")
    # Warm-up: the first 20% of the run, at least 30 s, at most half of it.
    warmup = min(max(0.2 * duration, 30.0), duration / 2)
    # The quiet tail, in which no fault starts: the longest fault and its grace fit in it.
    tail = max(0.1 * duration, 15.0)
    if opts.binary:
        binary = opts.binary.resolve()
    else:
        if not opts.no_build:
            subprocess.run(["cargo", "build", "--release", "--locked"], cwd=REPO, check=True)
        binary = REPO / "target" / "release" / "gatehouse"
    if not shutil.which("redis-server"):
        sys.exit("soak: redis-server not found (apt-get install redis-server)")
    # The attackers hold hundreds of sockets.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    opts.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gatehouse-soak-"))
    ports = {name: free_port() for name in ("http", "https", "admin")}
    group = Group(binary, work, ports, opts.backends)
    stop = threading.Event()
    threads = []
    try:
        shutil.copytree(REPO / "static", work / "static")
        group.start()
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        t0 = time.time()
        stats = Stats(t0)
        samples, deaths, timeline = [], [], []
        interval = opts.clients / opts.rps if opts.rps else 0
        probe_client = Client("http", ports, Stats(t0))
        token = login(probe_client)
        probe_client.close()
        if token is None:
            sys.exit("soak: cannot sign in")
        for i in range(opts.clients):
            threads.append(threading.Thread(target=load_worker, daemon=True,
                                            args=(i, "https" if i % 2 else "http", ports, stats, stop, interval, token)))
        threads.append(threading.Thread(target=login_worker, args=(ports, stats, stop, 0.5), daemon=True))
        threads.append(threading.Thread(target=sampler, args=(group, t0, opts.sample_every, samples, stop, deaths),
                                        daemon=True))
        faults = Faults(group, ports, token, stop, hold=12.0 if duration >= 300 else 8.0)
        plan = schedule(duration, warmup, tail)
        threads.append(threading.Thread(target=run_faults, args=(plan, faults, t0, stop, timeline),
                                        daemon=True))
        for thread in threads:
            thread.start()
        print(f"soak: {duration:.0f} s, {len(plan)} faults planned, group pid {group.proc.pid}, work dir {work}",
              flush=True)
        while time.time() < t0 + duration and not deaths:
            time.sleep(1)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        final = final_checks(group, ports, token)
        text, summary, passed = report(opts, stats, timeline, samples, deaths, final, duration, warmup, tail, started)
    finally:
        stop.set()
        group.stop()
        log_tail = (work / "gatehouse.log").read_text(errors="replace")[-4000:] if (work / "gatehouse.log").exists() else ""
        shutil.rmtree(work, ignore_errors=True)
    (opts.out / "soak.md").write_text(text)
    summary["gatehouse_log_tail"] = log_tail
    (opts.out / "soak.json").write_text(json.dumps(summary, indent=1))
    print(text)
    if not passed:
        print(f"gatehouse log (last lines):\n{log_tail}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
