#!/usr/bin/env python3
"""Benchmark gatehouse against nginx doing the same work, side by side, with oha.

One run builds a release, starts `gatehouse run` and an nginx configured to do the same work
(the same static files with gzip_static, the same backend processes over the same Unix sockets
with keepalive, the same basic auth), then drives oha with identical settings against both,
alternating, and prints a markdown table per scenario and side: rps, p50, p99; the edge
processes' (the gatehouse proxy; the nginx workers) user and system CPU microseconds per request
(utime and stime of /proc/PID/stat) and their voluntary and involuntary context switches per
request (/proc/PID/task/*/status); peak RSS of the edge, RSS of the edge plus the backends
halfway through each run, and the gatehouse/nginx ratios. A second table gives the edge's
syscalls per request by kind, from a separate short pass of `oha -n` per scenario with
`strace -c -f` attached to the edge processes (strace slows them many times over: that pass
counts, it does not time). Raw oha JSON and strace summaries go to the output directory.

Beside gatehouse's own backends, the rows cover named pools ([upstreams.NAME]) over the same
Unix sockets and over TCP to an origin of their own (a separate one-worker nginx answering a
fixed body, so its CPU is nobody's edge), and a route with a prefix rewrite, header rules and
CORS beside the same route without the rules; nginx does the same with proxy_pass to a URI,
proxy_set_header, add_header and a map of allowed origins. A cached row sends to that TCP origin
through a route with gatehouse's response cache ([routes.cache]) and, on nginx, a location with
proxy_cache; the origin answers that path with `Cache-Control: public, max-age=600`, both sides
add X-Cache, and both are warmed and seen to answer `X-Cache: HIT` before the row is measured,
so it times cache hits, not the origin.

    scripts/bench.py            # the full run (a few minutes)
    scripts/bench.py --quick    # a short smoke run, as CI does (no strace pass)
    scripts/bench.py --out DIR  # where the table and the raw JSON go
    scripts/bench.py --rate 4000  # open loop: oha offers 4,000 rps to each side (oha -q), so
                                  # CPU per request is compared at the same load
    scripts/bench.py --syscalls 5000  # requests per strace pass (default 5000; 0: no pass;
                                      # off in --quick unless given)
    scripts/bench.py --threads 1      # the gatehouse proxy's proxy.threads (default: the config's)
    scripts/bench.py --observability  # gatehouse with metrics and access logs on vs off
    scripts/bench.py --baseline OTHER --rounds 6  # this build vs another gatehouse binary
    scripts/bench.py --baseline-threads 1         # this build vs itself with proxy.threads = 1
    scripts/bench.py --identity --rounds 6  # /api/count: bearer token vs API key, and a request
                                            # writing an audit event vs one writing none

`--baseline` gives both sides one config, written in this checkout's shape: the other binary
must read that shape, so a build from before a change of the config's keys (one that refuses the
file) cannot be compared this way.

Timed figures move with whatever else the machine runs; for gatehouse's own code,
scripts/callgrind.py counts the proxy's instructions per request, which do not.

Needs oha (cargo install oha --locked), nginx, strace (for the syscall pass), and what gatehouse
itself needs. Everything runs on loopback and stops by itself.
"""

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SECRET = "benchmark-secret-0123456789abcdef-0123456789"
SECRET_ENV = "GATEHOUSE_JWT_SECRET"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pids):
    """(user, system) clock ticks of `pids`, each summed over all its threads, ended ones too."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
        except (OSError, IndexError, ValueError):
            pass
    return user, system


def switches(pids):
    """{(pid, thread id): [voluntary, involuntary]} context switches of every live thread of
    `pids`. /proc/PID/status counts the main thread alone, so each thread is read."""
    found = {}
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            counts = [0, 0]
            try:
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        counts[0] = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        counts[1] = int(line.split()[1])
            except OSError:
                continue
            found[(pid, task.name)] = counts
    return found


def switches_between(before, after):
    """(voluntary, involuntary) switches from `before` to `after`; a thread that ended in
    between is missing from `after`, and so are its switches (tokio's blocking threads end
    after 10 s idle; the proxy's worker threads and nginx's workers never do)."""
    vol = sum(v - before.get(key, (0, 0))[0] for key, (v, _) in after.items())
    invol = sum(n - before.get(key, (0, 0))[1] for key, (_, n) in after.items())
    return vol, invol


def status_mb(pids, field):
    """A memory field of /proc/PID/status (VmRSS, VmHWM), summed over `pids`, in MB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def children(pid):
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def answers_200(url):
    """Whether `url` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def wait_for(url, log, timeout=60, proc=None, answers=answers_200):
    """Until `answers(url)`; exits with the tail of `log` if not within `timeout` seconds, or if
    `proc` (the process that should answer) ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        if answers(url):
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log.exists() else ""
    ended = f" (it exited with code {proc.poll()})" if proc is not None and proc.poll() is not None else ""
    sys.exit(f"bench: {url} did not come up{ended}\n{tail}")


# Like nginx's keepalive_requests below: a benchmark's connections are not closed for having
# carried many requests.
BENCH_LIMITS = "max_requests_per_connection = 100000"


# oha offers `Accept-Encoding: gzip, compress, deflate, br` unless a request names its own, so a
# row without this header would measure gatehouse's brotli against nginx's gzip_static.
OHA_ACCEPT_ENCODING = "gzip, compress, deflate, br"
IDENTITY = ["-H", "Accept-Encoding: identity"]


def gatehouse_config(work, http, https, backends, admin=None, access_log="off", proxy_extra="",
                     limits=BENCH_LIMITS, access_extra="", sections="", routes="", root_extra=""):
    """The gatehouse config of a benchmark (and of soak.py, with more of it). `admin`: the
    admin listener's port (None: off, and no metrics kept); `access_log`: a file for every
    route's access log ("off" for none, like the nginx side); `proxy_extra`: more lines for
    [proxy]; `limits`: the lines of [limits]; `access_extra`: more lines for [access];
    `sections`: more tables; `routes`: more [[routes]]; `root_extra`: more lines for the route
    of `/`."""
    static = work / "static"
    admin_listen = f"127.0.0.1:{admin}" if admin else "off"
    return f"""
[admin]
listen = "{admin_listen}"

[logging]
access_log = "{access_log}"

[proxy]
listen = "127.0.0.1:{http}"
{proxy_extra}

[limits]
{limits}

[access]
# Measured clients send far more than a person would: no throttling unless a route asks.
default_rate_limit = "off"
{access_extra}

[tls]
listen = "127.0.0.1:{https}"
cert = "{work}/cert.pem"
key = "{work}/key.pem"
redirect_http = false

[backend]
count = {backends}
users_file = "{REPO}/conf/users"

[paths]
runtime_dir = "{work}/run"
data_dir = "{work}/data"
{sections}
[[routes]]
prefix = "/api/"
upstream = "backends"

[[routes]]
prefix = "/auth/"
upstream = "backends"

[[routes]]
prefix = "/close/"
static_dir = "{static}/close"
allow = ["127.0.0.1"]
htpasswd = "{REPO}/conf/htpasswd"
{routes}
[[routes]]
prefix = "/"
static_dir = "{static}/main"
{root_extra}
"""


def nginx_config(work, http, https, backends, workers, access_log=None, origin=None):
    """`access_log`: a file for nginx's access log in its default format, written at each
    request as nginx does by default (None: off); `origin`: the port of the TCP origin
    (ORIGIN_CONFIG) that /tcppool/ goes to."""
    static = work / "static"
    access = f"access_log {access_log};" if access_log else "access_log off;"
    # What every proxied location sends upstream, as gatehouse does.
    proxied = ('proxy_http_version 1.1; proxy_set_header Connection ""; '
               "proxy_set_header X-Request-ID $request_id; proxy_set_header X-Forwarded-For $remote_addr;")
    servers = "\n".join(f"        server unix:{work}/run/backend-{i}.sock;" for i in range(1, backends + 1))
    # Workers run as us, so they can reach the backend sockets in our private directory.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes {workers};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    {access}
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    gzip_static on;
    upstream backends {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl http2;
        ssl_certificate {work}/cert.pem;
        ssl_certificate_key {work}/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location /api/ {{
            proxy_pass http://backends;
            {proxied}
        }}
        location /close/ {{
            alias {static}/close/;
            allow 127.0.0.1;
            deny all;
            auth_basic "gatehouse";
            auth_basic_user_file {REPO}/conf/htpasswd;
        }}
        location / {{ root {static}/main; }}
        # As gatehouse's named pools and the route with header rules and CORS (POOL_ROUTES).
        location /unixpool/ {{
            proxy_pass http://backends/api/;
            {proxied}
        }}
        location /tcppool/ {{
            proxy_pass http://origin;
            {proxied}
        }}
        # As gatehouse's route cache (CACHE_ROUTES): the origin's Cache-Control decides, one
        # request fills an entry while the others wait (gatehouse's cache.lock_timeout), and
        # X-Cache tells what the cache did.
        location /cached/ {{
            proxy_pass http://origin;
            {proxied}
            proxy_cache edge_cache;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 5s;
            add_header X-Cache $upstream_cache_status always;
        }}
        location /plain/ {{
            proxy_pass http://backends/api/;
            {proxied}
        }}
        location /rules/ {{
            proxy_pass http://backends/api/;
            {proxied}
            proxy_set_header X-Env prod;
            proxy_set_header X-Client $remote_addr;
            proxy_set_header X-Debug "";
            proxy_hide_header Server;
            add_header X-Served-By edge-$request_id;
            add_header Access-Control-Allow-Origin $cors_origin;
            add_header Vary Origin;
        }}
    }}
    map $http_origin $cors_origin {{
        "https://app.example" $http_origin;
        default "";
    }}
    upstream origin {{
        server 127.0.0.1:{origin or 9};
        keepalive 64;
    }}
    # As gatehouse's [cache] (CACHE_SECTION): 64 MiB.
    proxy_cache_path {work}/nginx-cache levels=1:2 keys_zone=edge_cache:10m max_size=64m inactive=10m
                     use_temp_path=off;
}}
"""


# A TCP origin for the named-pool row over TCP: an nginx of its own (so its CPU is not the
# edge's), one worker, a fixed small answer.
ORIGIN_CONFIG = """
{user}
worker_processes 1;
pid {work}/origin.pid;
error_log {work}/origin-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{{"status":"ok"}}';
        }}
        # The cached row's path: the same answer, which a shared cache may keep for 10 minutes.
        # Logged, to count what reached the origin through the caches.
        location /cached/ {{
            access_log {work}/origin-cached.log;
            default_type application/json;
            add_header Cache-Control "public, max-age=600" always;
            return 200 '{{"status":"ok"}}';
        }}
    }}
}}
"""


def pool_sections(work, backends, origin):
    """gatehouse's named pools for the pool rows: the backends' sockets, and the TCP origin."""
    sockets = ", ".join(f'"unix:{work}/run/backend-{i}.sock"' for i in range(1, backends + 1))
    return f"""
[upstreams.unixpool]
servers = [{sockets}]

[upstreams.tcppool]
servers = ["127.0.0.1:{origin}"]
"""


# The routes of the pool rows, and a route with header rules and CORS beside the same route
# without them (both rewrite /X/ to /api/, as nginx's proxy_pass with a URI does).
POOL_ROUTES = """
[[routes]]
prefix = "/unixpool/"
upstream = "unixpool"
rewrite_prefix = "/api/"

[[routes]]
prefix = "/tcppool/"
upstream = "tcppool"

[[routes]]
prefix = "/plain/"
upstream = "backends"
rewrite_prefix = "/api/"

[[routes]]
prefix = "/rules/"
upstream = "backends"
rewrite_prefix = "/api/"
request_headers = { set = { "X-Env" = "prod", "X-Client" = "$client_ip" }, remove = ["X-Debug"] }
response_headers = { set = { "X-Served-By" = "edge-$request_id" }, remove = ["Server"] }
cors = { origins = ["https://app.example"] }
"""

# The cached row's route and the cache's memory, apart from POOL_ROUTES (which
# scripts/callgrind.py also gives binaries from before [cache] existed): the TCP pool with the
# response cache, which keeps what the origin's Cache-Control allows. The same 64 MiB as the
# nginx side's max_size (and gatehouse's default).
CACHE_SECTION = """
[cache]
max_bytes = 67108864
"""
CACHE_ROUTES = """
[[routes]]
prefix = "/cached/"
upstream = "tcppool"

[routes.cache]
max_ttl = "1h"
default_ttl = "0s"
"""


def oha(args, url, out_file, group=()):
    """Runs oha; with `group`, also returns those processes' summed RSS halfway through."""
    proc = subprocess.Popen(
        ["oha", "--no-tui", "--output-format", "json", "--insecure", *args, url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    group_mb = None
    if group:
        seconds = float(args[args.index("-z") + 1].rstrip("s"))
        time.sleep(seconds / 2)
        group_mb = status_mb(group, "VmRSS")
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"bench: oha failed on {url}: {err.strip()}")
    out_file.write_text(out)
    return json.loads(out), group_mb


def served_ok(data, label, url):
    """The responses oha counted; exits unless at least 99% of them were 2xx."""
    counts = data.get("statusCodeDistribution", {})
    served = sum(counts.values())
    ok = sum(n for code, n in counts.items() if code.startswith("2"))
    if served == 0 or ok / served < 0.99:
        sys.exit(f"bench: {label} at {url}: only {ok} of {served} responses were 2xx: {counts}")
    return served


def measure(label, args, url, pids, out_dir, run_id, group=()):
    """`pids`: the edge processes, for CPU, context switches and peak RSS; `group`: edge and
    backends, whose RSS is taken under load."""
    cpu_before, switches_before = cpu_ticks(pids), switches(pids)
    data, group_mb = oha(args, url, out_dir / f"{run_id}.json", group)
    cpu_after, switches_after = cpu_ticks(pids), switches(pids)
    served = served_ok(data, label, url)
    vol, invol = switches_between(switches_before, switches_after)
    pct = data["latencyPercentiles"]
    user, system = (
        (after - before) / CLOCK_TICKS * 1e6 / served for before, after in zip(cpu_before, cpu_after)
    )
    return {
        "rps": data["summary"]["requestsPerSec"],
        "p50": pct["p50"] * 1000,
        "p99": pct["p99"] * 1000,
        "user_us": user,
        "sys_us": system,
        "cpu_us": user + system,
        "vcsw": vol / served,
        "ivcsw": invol / served,
        "rss_mb": status_mb(pids, "VmHWM"),
        "group_mb": group_mb or 0.0,
    }


def strace_counts(pids, args, url, label, out_file):
    """Syscalls per request by kind of the processes `pids` (all their threads), over one
    `oha` run with a fixed request count, attached to by `strace -c -f`."""
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-U", "name,calls", "-o", str(out_file),
         *[arg for pid in pids for arg in ("-p", str(pid))]],
        stderr=subprocess.PIPE, text=True,
    )
    # One "Process N attached" line per process, once all its threads are traced.
    for _ in pids:
        if not tracer.stderr.readline():
            sys.exit(f"bench: strace could not attach to {pids}: {tracer.communicate()[1].strip()}")
    try:
        data, _ = oha(args, url, out_file.with_suffix(".json"))
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.communicate(timeout=60)
    served = served_ok(data, label, url)
    calls = {}
    for line in out_file.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit() and fields[0] != "total":
            calls[fields[0]] = int(fields[1]) / served
    return calls


def syscall_pass(opts, targets, scenarios, connections, out_dir, results, prefix=""):
    """One strace run per scenario and side (`targets`: name -> (http port, https port, edge
    pids); `scenarios`: one list for all, or name -> list); returns {(label, name): {syscall: calls per request}}. Each run sends `--syscalls`
    requests, or what the side served in 2 s of the timed runs when that is fewer (nginx's
    /close/ hashes a password per request: 5,000 would take minutes), at least 200."""
    if not opts.syscalls:
        return {}
    if not shutil.which("strace"):
        sys.exit("bench: strace not found (apt-get install strace), or pass --syscalls 0")
    found = {}
    for index in range(len(next(iter(scenarios.values())) if isinstance(scenarios, dict) else scenarios)):
        for name, (http, https, pids) in targets.items():
            label, args, scheme, path = (scenarios[name] if isinstance(scenarios, dict) else scenarios)[index]
            port = http if scheme == "http" else https
            url = f"{scheme}://127.0.0.1:{port}{path}"
            out_file = out_dir / f"{prefix}strace-s{index}-{name}.txt"
            settle(http)
            requests = max(200, min(opts.syscalls, int(2 * median_of(results, label, name, "rps"))))
            found[(label, name)] = strace_counts(
                pids, ["-n", str(requests), "-c", str(connections), *args], url, label, out_file)
    return found


def syscall_table(calls, names, scenarios, top=6):
    """Markdown lines: per scenario and side, all syscalls, futex apart, the most frequent kinds."""
    if not calls:
        return []
    lines = [
        "",
        "Edge syscalls per request (strace -c -f attached during a fixed oha -n run; counts only):",
        "",
        "| scenario | server | syscalls/req | futex/req | most frequent kinds (calls/req) |",
        "|---|---|---|---|---|",
    ]
    for label, *_ in scenarios:
        for name in names:
            kinds = calls[(label, name)]
            common = sorted(kinds.items(), key=lambda kv: -kv[1])[:top]
            lines.append(
                f"| {label} | {name} | {sum(kinds.values()):.2f} | {kinds.get('futex', 0):.2f} | "
                + ", ".join(f"{kind} {n:.2f}" for kind, n in common) + " |"
            )
    return lines


def load_args(opts, duration, connections):
    """oha's arguments for the timed runs: closed loop (as fast as `connections` allow), or
    open loop at `--rate` requests per second offered."""
    args = ["-z", duration, "-c", str(connections)]
    if opts.rate:
        args += ["-q", str(opts.rate), "--latency-correction"]
    return args


def load_words(opts, connections, duration):
    words = f"oha -c {connections}, {duration} per run"
    if opts.rate:
        words += f", open loop at {opts.rate:,} rps offered (oha -q; rps below 95% of it marked *)"
    return words


def rps_cell(opts, rps):
    return f"{rps:,.0f}" + ("*" if opts.rate and rps < 0.95 * opts.rate else "")


def settle(http_port):
    """Waits until the server answers a static page again. A run ends with requests still in
    flight; when they are slow (nginx's basic auth hashes the password each time, 0.1 s of CPU
    or more), they would eat into the next run."""
    wait_for(f"http://127.0.0.1:{http_port}/", Path(os.devnull), timeout=120)


def copy_static(work):
    """The same files for both sides, with the .gz beside each text file (nginx gzip_static; a
    fresh .gz beside a file is what gatehouse serves too)."""
    shutil.copytree(REPO / "static", work / "static")
    for path in (work / "static").rglob("*"):
        if path.suffix in (".html", ".css", ".svg"):
            subprocess.run(["gzip", "-9", "-k", "-f", str(path)], check=True)


def login_token(http_port):
    login = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/auth/login",
        data=json.dumps({"username": "admin", "password": "password"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    return json.load(urllib.request.urlopen(login))["token"]


def median_of(results, label, name, key):
    return statistics.median(r[key] for r in results[(label, name)])


def stop_all(processes, work):
    """SIGTERM to what we started (and nginx's master, by its pid file), then clean up."""
    for proc in processes:
        proc.send_signal(signal.SIGTERM)
    for pid_file in (work / "nginx.pid", work / "origin.pid"):
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGQUIT)
    for proc in processes:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(work, ignore_errors=True)


def threads_line(threads):
    return "" if threads is None else f"threads = {threads}"


def start_group(binary, work, name, backends, admin, access_log, threads=None, extra_env=None, sections=""):
    """Starts `gatehouse run` in its own directory under `work`, with `extra_env` over this
    environment and `sections` (more tables) in its config; returns (process, http port, https
    port, proxy pids)."""
    home = work / name
    home.mkdir()
    http, https = free_port(), free_port()
    config = home / "gatehouse.toml"
    text = gatehouse_config(work, http, https, backends, admin, access_log or "off", threads_line(threads),
                            sections=sections)
    config.write_text(text.replace(f'"{work}/run"', f'"{home}/run"').replace(f'"{work}/data"', f'"{home}/data"'))
    env = dict(os.environ, **{SECRET_ENV: SECRET}, RUST_LOG="warn", **(extra_env or {}))
    log = open(home / "gatehouse.log", "w")
    group = subprocess.Popen([binary, "run", "--config", config], env=env, stdout=log, stderr=log)
    wait_for(f"http://127.0.0.1:{http}/api/ping", home / "gatehouse.log")
    proxy = [p for p in children(group.pid) if " proxy " in cmdline(p)]
    return group, http, https, proxy


def nginx_edge(master, workers, timeout=30):
    """nginx's edge processes: its `workers` workers and its cache manager (proxy_cache's
    upkeep, as gatehouse's is in its proxy), once all have started and named themselves (a
    child just forked still shows the master's command line); not the cache loader, which
    reads the cache directory once and exits."""
    deadline = time.time() + timeout
    while True:
        names = {pid: cmdline(pid) for pid in children(master)}
        found = [pid for pid, name in names.items() if "worker process" in name or "cache manager" in name]
        if len(found) == workers + 1:
            return found
        if time.time() > deadline:
            sys.exit(f"bench: nginx started {len(found)} of {workers} workers and a cache manager: {names}")
        time.sleep(0.1)


# The cached row's path (CACHE_ROUTES; nginx's location /cached/).
CACHED_PATH = "/cached/ping"


def cache_status(http_port):
    """The X-Cache header of a GET of the cached row's path on one side (None if missing)."""
    url = f"http://127.0.0.1:{http_port}{CACHED_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read()
            return r.headers.get("X-Cache")
    except Exception as e:
        sys.exit(f"bench: {url} failed: {e}")


def expect_hit(name, http_port):
    """Exits unless the side answers the cached row's path from its cache."""
    status = cache_status(http_port)
    if (status or "").upper() != "HIT":
        sys.exit(f"bench: {name} did not answer {CACHED_PATH} from its cache (X-Cache: {status}); "
                 "the cached row would time the origin, not the cache")


def warm_cache(name, http_port):
    """One request fills (or refreshes) the side's cache; the next must be a hit."""
    cache_status(http_port)
    expect_hit(name, http_port)


def expect_encoding(name, label, args, url):
    """Exits unless the side answers a static row in the coding its label names (identity or
    gzip), so that a row never times one coding against another."""
    want = next((coding for coding in ("identity", "gzip") if coding in label), None)
    if want is None or not label.startswith("static page"):
        return
    # What oha sends: its own Accept-Encoding unless the row names one (urllib would send
    # `identity` for a row without one, and so pass the very fault this check is for).
    headers = {"Accept-Encoding": OHA_ACCEPT_ENCODING}
    for flag, header in zip(args, args[1:]):
        if flag == "-H" and ":" in header:
            header_name, value = header.split(":", 1)
            headers[header_name.strip()] = value.strip()
    context = ssl._create_unverified_context()
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=5, context=context) as r:
            r.read()
            got = r.headers.get("Content-Encoding") or "identity"
    except Exception as e:
        sys.exit(f"bench: {url} failed: {e}")
    if got != want:
        sys.exit(f"bench: {name} answered \"{label}\" with Content-Encoding {got}, not {want}")


def only(opts, scenarios):
    """The scenarios `--only` asks for (all without it)."""
    if not opts.only:
        return scenarios
    words = [w.strip().lower() for w in opts.only.split(",") if w.strip()]
    return [s for s in scenarios if any(w in s[0].lower() for w in words)]


def side_by_side(opts, sides, all_scenarios, title, file_name):
    """Groups started side by side, one per entry of `sides` (name -> (binary, admin port or
    None, access log or "", proxy.threads or None[, environment over this one])), all with the
    same config otherwise; the
    same oha runs alternate between them, round after round. Writes and prints a table of
    medians, the first side against the second, and the syscall pass's table."""
    def scenarios(token):
        return only(opts, all_scenarios(token))

    duration, connections, rounds = ("1s", 16, 1) if opts.quick else ("8s", 64, opts.rounds)
    opts.out.mkdir(parents=True, exist_ok=True)
    raw = opts.out / "raw"
    raw.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gatehouse-bench-"))
    processes = []
    first_binary = next(iter(sides.values()))[0]
    try:
        copy_static(work)
        (work / "gatehouse.toml").write_text(gatehouse_config(work, 1, 2, 1))
        subprocess.run([first_binary, "cert", "--config", work / "gatehouse.toml"], check=True, capture_output=True)
        groups = {}
        for name, (binary, admin, access_log, threads, *extra_env) in sides.items():
            group, http, https, proxy = start_group(binary, work, name, 3, admin, access_log, threads,
                                                    *extra_env)
            processes.append(group)
            groups[name] = (http, https, proxy)
        # A token each: a group's sessions live in its own Redis.
        token = {name: login_token(http) for name, (http, _, _) in groups.items()}
        for name, (http, https, _) in groups.items():
            for label, args, scheme, path in scenarios(token[name]):
                port = http if scheme == "http" else https
                expect_encoding(name, label, args, f"{scheme}://127.0.0.1:{port}{path}")
        base = load_args(opts, duration, connections)
        results = {}
        for round_no in range(rounds):
            for index in range(len(scenarios(""))):
                for name, (http, https, pids) in groups.items():
                    label, args, scheme, path = scenarios(token[name])[index]
                    run_id = f"{file_name}-r{round_no}-s{index}-{name}"
                    port = http if scheme == "http" else https
                    url = f"{scheme}://127.0.0.1:{port}{path}"
                    settle(http)
                    results.setdefault((label, name), []).append(measure(label, base + args, url, pids, raw, run_id))
        calls = syscall_pass(opts, groups, {name: scenarios(token[name]) for name in groups}, connections, raw,
                             results, f"{file_name}-")
        logged = {name: sum(1 for _ in open(log)) for name, (_, _, log, *_) in sides.items() if log}
    finally:
        stop_all(processes, work)

    def med(label, name, key):
        return median_of(results, label, name, key)

    a, b = list(sides)
    lines = [
        title(opts, connections, duration, rounds, logged),
        "",
        f"| scenario | rps {a} | rps {b} | {a}/{b} | p99 ms {a} | p99 ms {b} | proxy CPU us/req {a} | {b} | CPU {a}/{b} "
        f"| user us/req {a} | {b} | sys us/req {a} | {b} | ctx sw/req {a} | {b} | proxy peak RSS MB {a} | {b} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, *_ in scenarios(""):
        ra, rb = (med(label, n, "rps") for n in (a, b))
        ca, cb = (med(label, n, "cpu_us") for n in (a, b))
        lines.append(
            f"| {label} | {rps_cell(opts, ra)} | {rps_cell(opts, rb)} | {ra / rb:.3f}x | {med(label, a, 'p99'):.2f} | "
            f"{med(label, b, 'p99'):.2f} | {ca:.1f} | {cb:.1f} | {ca / max(cb, 0.01):.3f}x | "
            f"{med(label, a, 'user_us'):.1f} | {med(label, b, 'user_us'):.1f} | "
            f"{med(label, a, 'sys_us'):.1f} | {med(label, b, 'sys_us'):.1f} | "
            f"{switches_cell(results, label, a)} | {switches_cell(results, label, b)} | "
            f"{med(label, a, 'rss_mb'):.1f} | {med(label, b, 'rss_mb'):.1f} |"
        )
    lines += syscall_table(calls, (a, b), scenarios(""))
    table = "\n".join(lines) + "\n"
    (opts.out / f"{file_name}.md").write_text(table)
    print(table)


def switches_cell(results, label, name):
    """Voluntary + involuntary context switches per request, medians."""
    vol, invol = (median_of(results, label, name, key) for key in ("vcsw", "ivcsw"))
    return f"{vol:.2f} + {invol:.2f}"


def command_words():
    return "`scripts/bench.py" + "".join(f" {arg}" for arg in sys.argv[1:]) + "`"


def threads_words(threads):
    return "default (one per core)" if threads is None else str(threads)


def observability(opts, binary):
    """One binary twice: metrics (admin listener) and JSON access logs to a file on one side,
    both off on the other."""
    log_dir = Path(tempfile.mkdtemp(prefix="gatehouse-bench-logs-"))
    sides = {
        "on": (binary, free_port(), str(log_dir / "access.log"), opts.threads),
        "off": (binary, None, "", opts.threads),
    }

    def scenarios(token):
        return [
            ("static page, gzip, HTTP", ["-H", "Accept-Encoding: gzip"], "http", "/"),
            ("GET /api/ping", [], "http", "/api/ping"),
            ("GET /api/count (JWT + Redis)", ["-H", f"Authorization: Bearer {token}"], "http", "/api/count"),
        ]

    def title(opts, connections, duration, rounds, logged):
        return (
            f"{command_words()}: {load_words(opts, connections, duration)}, "
            f"{rounds} round(s) alternating, medians; {os.cpu_count()} cores; 'on' = metrics kept and "
            f"scraped-ready, JSON access log to a file ({logged.get('on', 0):,} lines written); 'off' = neither."
        )

    try:
        side_by_side(opts, sides, scenarios, title, "observability")
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def baseline(opts, binary):
    """This build against another gatehouse binary (`--baseline`, else this one) with its own
    proxy.threads (`--baseline-threads`, else `--threads`), same config otherwise, metrics on
    and access logs off on both: what a change costs, measured in one run."""
    base_threads = opts.threads if opts.baseline_threads is None else opts.baseline_threads
    base_env = dict(pair.split("=", 1) for pair in opts.baseline_env)
    sides = {
        "new": (binary, free_port(), "", opts.threads),
        "base": (opts.baseline or binary, free_port(), "", base_threads, base_env),
    }

    def scenarios(token):
        gzip = ["-H", "Accept-Encoding: gzip"]
        return [
            ("static page, identity, HTTP", IDENTITY, "http", "/"),
            ("static page, gzip, HTTP", gzip, "http", "/"),
            ("static page, identity, HTTPS", IDENTITY, "https", "/"),
            ("GET /api/ping", [], "http", "/api/ping"),
            ("GET /api/ping, HTTPS", [], "https", "/api/ping"),
            ("GET /api/ping, HTTP/2 over TLS", ["--http2"], "https", "/api/ping"),
            ("GET /api/count (JWT + Redis)", ["-H", f"Authorization: Bearer {token}"], "http", "/api/count"),
        ]

    def title(opts, connections, duration, rounds, logged):
        return (
            f"{command_words()}: {load_words(opts, connections, duration)}, {rounds} round(s) alternating "
            f"new/base, medians; {os.cpu_count()} cores; proxy.threads new {threads_words(opts.threads)}, "
            f"base {threads_words(base_threads)}"
            + "".join(f", base {pair}" for pair in opts.baseline_env) + "."
        )

    side_by_side(opts, sides, scenarios, title, "baseline")


def identity(opts, binary):
    """What identity costs on /api/count, in one group, the runs alternating round after
    round: a bearer token against an API key (the key's check and guard in one script, against
    the token's signature and one MULTI), and a request that writes an audit event (DELETE
    /api/count by a maintainer key: a line to the audit file and an XADD) against the same key's
    GET, which writes none. CPU is the whole group's: proxy, backends and Redis."""
    duration, connections, rounds = ("1s", 16, 1) if opts.quick else ("8s", 64, opts.rounds)
    opts.out.mkdir(parents=True, exist_ok=True)
    raw = opts.out / "raw"
    raw.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gatehouse-bench-"))
    processes = []
    try:
        copy_static(work)
        (work / "gatehouse.toml").write_text(gatehouse_config(work, 1, 2, 1))
        subprocess.run([binary, "cert", "--config", work / "gatehouse.toml"], check=True, capture_output=True)
        audit_log = work / "audit.log"
        group, http, _, _ = start_group(binary, work, "identity", 3, free_port(), "", opts.threads,
                                        sections=f'[audit]\nfile = "{audit_log}"\n')
        processes.append(group)
        pids = children(group.pid)
        token = login_token(http)
        made = urllib.request.Request(
            f"http://127.0.0.1:{http}/api/keys",
            data=json.dumps({"name": "bench", "role": "maintainer"}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        key = json.load(urllib.request.urlopen(made))["key"]
        scenarios = [
            ("GET /api/count, bearer token", ["-H", f"Authorization: Bearer {token}"]),
            ("GET /api/count, API key", ["-H", f"X-API-Key: {key}"]),
            ("DELETE /api/count, API key: one audit event each", ["-m", "DELETE", "-H", f"X-API-Key: {key}"]),
        ]
        base = load_args(opts, duration, connections)
        url = f"http://127.0.0.1:{http}/api/count"
        results = {}
        for round_no in range(rounds):
            for index, (label, args) in enumerate(scenarios):
                settle(http)
                run_id = f"identity-r{round_no}-s{index}"
                results.setdefault((label, "group"), []).append(measure(label, base + args, url, pids, raw, run_id))
        events = sum(1 for _ in open(audit_log))
        # The stream's memory per event, at its cap (audit.max_events, 100,000 by default).
        redis = ["redis-cli", "-s", str(work / "identity" / "run" / "redis.sock")]
        kept = int(subprocess.run([*redis, "XLEN", "gatehouse:audit"], capture_output=True, text=True,
                                  check=True).stdout)
        stream_bytes = int(subprocess.run([*redis, "MEMORY", "USAGE", "gatehouse:audit", "SAMPLES", "0"],
                                          capture_output=True, text=True, check=True).stdout)
    finally:
        stop_all(processes, work)

    def med(label, key):
        return median_of(results, label, "group", key)

    first = scenarios[0][0]
    lines = [
        f"{command_words()}: {load_words(opts, connections, duration)}, {rounds} round(s) alternating, "
        f"medians; {os.cpu_count()} cores; one group (3 backends, managed Redis); CPU of the whole group "
        f"(proxy, backends, Redis); {events:,} audit events written, {kept:,} kept in the Redis stream: "
        f"{stream_bytes / 1048576:.2f} MiB ({stream_bytes / max(kept, 1):.0f} bytes an event, "
        f"{stream_bytes / max(kept, 1) * 10000 / 1048576:.2f} MiB per 10,000).",
        "",
        "| scenario | rps | vs first | p99 ms | group CPU us/req | vs first | ctx sw/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, _ in scenarios:
        lines.append(
            f"| {label} | {rps_cell(opts, med(label, 'rps'))} | {med(label, 'rps') / med(first, 'rps'):.3f}x | "
            f"{med(label, 'p99'):.2f} | {med(label, 'cpu_us'):.1f} | "
            f"{med(label, 'cpu_us') / med(first, 'cpu_us'):.3f}x | {switches_cell(results, label, 'group')} |"
        )
    table = "\n".join(lines) + "\n"
    (opts.out / "identity.md").write_text(table)
    print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "target" / "bench", help="results directory")
    parser.add_argument("--no-build", action="store_true", help="use the existing release binary")
    parser.add_argument("--rate", type=int, metavar="RPS",
                        help="open loop: offer this many requests per second to each side (oha -q)")
    parser.add_argument("--syscalls", type=int, metavar="N",
                        help="requests per strace pass (default 5000, and 0 in --quick; 0: none)")
    parser.add_argument("--threads", type=int, help="the gatehouse proxy's proxy.threads")
    parser.add_argument("--observability", action="store_true",
                        help="compare gatehouse with metrics and access logs on and off")
    parser.add_argument("--baseline", type=Path,
                        help="compare this build with another gatehouse binary, alternating")
    parser.add_argument("--baseline-threads", type=int,
                        help="proxy.threads of the --baseline side (alone: this build against itself)")
    parser.add_argument("--baseline-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable of the --baseline side only (repeatable; alone: "
                             "this build against itself, for example GATEHOUSE_ALLOCATOR=system)")
    parser.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "gatehouse",
                        help="this build's gatehouse binary (default: the release build)")
    parser.add_argument("--only", metavar="WORDS",
                        help="only the scenarios whose label holds one of these comma-separated words "
                             "(for example ping,count)")
    parser.add_argument("--access-logs", choices=("on", "off"), default="on",
                        help="access logs on both sides in the gatehouse/nginx table (default on, "
                             "as both ship)")
    parser.add_argument("--identity", action="store_true",
                        help="bearer token against API key, and an audit event's cost, on /api/count")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds for --observability, --baseline and --identity")
    opts = parser.parse_args()
    if opts.syscalls is None:
        opts.syscalls = 0 if opts.quick else 5000

    for tool in ("oha", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (oha: cargo install oha --locked; nginx: apt-get install nginx)")
    if not opts.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=REPO, check=True)
    binary = opts.binary
    if opts.identity:
        identity(opts, binary)
        return
    if opts.observability:
        observability(opts, binary)
        return
    if any(pair.count("=") == 0 for pair in opts.baseline_env):
        sys.exit("bench: --baseline-env takes NAME=VALUE")
    if opts.baseline or opts.baseline_threads is not None or opts.baseline_env:
        baseline(opts, binary)
        return

    duration, connections, rounds = ("1s", 16, 1) if opts.quick else ("8s", 64, 2)
    backends = 3
    workers = os.cpu_count() or 1
    opts.out.mkdir(parents=True, exist_ok=True)
    raw = opts.out / "raw"
    raw.mkdir(exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="gatehouse-bench-"))
    processes = []
    try:
        copy_static(work)
        ports = {name: free_port() for name in ("gh_http", "gh_https", "ngx_http", "ngx_https", "origin")}
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        (work / "origin.conf").write_text(ORIGIN_CONFIG.format(user=user, work=work, port=ports["origin"]))
        subprocess.run(["nginx", "-c", work / "origin.conf"], check=True)
        wait_for(f"http://127.0.0.1:{ports['origin']}/", work / "origin-error.log")
        # Metrics on (gatehouse always keeps them in production); access logs as both ship
        # (on) unless --access-logs off.
        logs = opts.access_logs == "on"
        (work / "gatehouse.toml").write_text(gatehouse_config(
            work, ports["gh_http"], ports["gh_https"], backends, admin=free_port(),
            access_log=f"{work}/gatehouse-access.log" if logs else "off",
            proxy_extra=threads_line(opts.threads),
            sections=pool_sections(work, backends, ports["origin"]) + CACHE_SECTION,
            routes=POOL_ROUTES + CACHE_ROUTES))
        subprocess.run([binary, "cert", "--config", work / "gatehouse.toml"], check=True, capture_output=True)
        env = dict(os.environ, **{SECRET_ENV: SECRET}, RUST_LOG="warn")
        log = open(work / "gatehouse.log", "w")
        group = subprocess.Popen([binary, "run", "--config", work / "gatehouse.toml"], env=env, stdout=log, stderr=log)
        processes.append(group)
        wait_for(f"http://127.0.0.1:{ports['gh_http']}/api/ping", work / "gatehouse.log")
        members = children(group.pid)
        proxy = [p for p in members if " proxy " in cmdline(p)]
        backend_pids = [p for p in members if " backend " in cmdline(p)]
        backend_socket = work / "run" / "backend-1.sock"

        (work / "nginx.conf").write_text(nginx_config(work, ports["ngx_http"], ports["ngx_https"], backends, workers,
                                                      f"{work}/nginx-access.log" if logs else None,
                                                      origin=ports["origin"]))
        subprocess.run(["nginx", "-c", work / "nginx.conf"], check=True)
        wait_for(f"http://127.0.0.1:{ports['ngx_http']}/api/ping", work / "nginx-error.log")
        nginx_master = int((work / "nginx.pid").read_text())
        nginx_workers = nginx_edge(nginx_master, workers)
        # The memory each side needs: its edge processes and the backends both use.
        groups = {"gatehouse": proxy + backend_pids, "nginx": [nginx_master] + nginx_workers + backend_pids}

        token = login_token(ports["gh_http"])

        base = load_args(opts, duration, connections)
        gzip = ["-H", "Accept-Encoding: gzip"]
        scenarios = [
            ("static page, identity, HTTP", IDENTITY, "http", "/"),
            ("static page, gzip, HTTP", gzip, "http", "/"),
            ("static page, identity, HTTPS", IDENTITY, "https", "/"),
            ("static page, gzip, HTTPS", gzip, "https", "/"),
            ("GET /api/ping", [], "http", "/api/ping"),
            ("GET /api/ping, HTTP/2 over TLS", ["--http2"], "https", "/api/ping"),
            ("GET /api/count (JWT + Redis)", ["-H", f"Authorization: Bearer {token}"], "http", "/api/count"),
            ("GET ping, named pool over Unix sockets", [], "http", "/unixpool/ping"),
            ("GET ping, named pool over TCP (an nginx origin)", [], "http", "/tcppool/ping"),
            ("GET ping, prefix rewritten", [], "http", "/plain/ping"),
            ("GET ping, prefix rewritten + header rules + CORS", ["-H", "Origin: https://app.example"], "http",
             "/rules/ping"),
            ("GET cached response (route cache / proxy_cache)", [], "http", CACHED_PATH),
            # Last: nginx hashes a bcrypt password per request and goes on hashing the requests
            # still queued after the run, which would take CPU from whatever ran next.
            ("GET /close/ (allowlist + basic auth)", ["-a", "admin:homework"], "http", "/close/"),
        ]
        scenarios = only(opts, scenarios)
        servers = {
            "gatehouse": (ports["gh_http"], ports["gh_https"], proxy),
            "nginx": (ports["ngx_http"], ports["ngx_https"], nginx_workers),
        }
        cached = any(path == CACHED_PATH for *_, path in scenarios)
        if cached:
            for name, (http, *_) in servers.items():
                warm_cache(name, http)
        for label, args, scheme, path in scenarios:
            for name, (http, https, _) in servers.items():
                port = http if scheme == "http" else https
                expect_encoding(name, label, args, f"{scheme}://127.0.0.1:{port}{path}")
        results = {}
        for round_no in range(rounds):
            for index, (label, args, scheme, path) in enumerate(scenarios):
                for name, (http, https, pids) in servers.items():
                    port = http if scheme == "http" else https
                    url = f"{scheme}://127.0.0.1:{port}{path}"
                    run_id = f"r{round_no}-s{index}-{name}"
                    settle(http)
                    results.setdefault((label, name), []).append(
                        measure(label, base + args, url, pids, raw, run_id, groups[name])
                    )
        calls = syscall_pass(opts, servers, scenarios, connections, raw, results)
        if cached:
            # Still answered from the caches after all that load (a full run outlasts the
            # origin's 10 minutes: the first request may refresh the entry, the next must hit).
            for name, (http, *_) in servers.items():
                warm_cache(name, http)
            origin_log = work / "origin-cached.log"
            origin_hits = sum(1 for _ in open(origin_log)) if origin_log.exists() else 0
        ceiling = measure(
            "ceiling", base + ["--unix-socket", str(backend_socket)], "http://localhost/api/ping",
            [p for p in members if "backend-1.sock" in cmdline(p)], raw, "ceiling",
        )
    finally:
        stop_all(processes, work)

    def med(label, name, key):
        return median_of(results, label, name, key)

    lines = [
        f"{command_words()}: {load_words(opts, connections, duration)}, {rounds} round(s) alternating, medians; "
        f"{os.cpu_count()} cores; edge = gatehouse proxy (proxy.threads {threads_words(opts.threads)}) / nginx "
        f"workers ({workers}); {backends} backends shared by both; metrics on; access logs {opts.access_logs} on both "
        "sides; ctx sw = voluntary + involuntary context switches of the edge's threads.",
        "",
        "| scenario | server | rps | p50 ms | p99 ms | edge CPU us/req | user us/req | sys us/req | ctx sw/req "
        "| edge peak RSS MB | group RSS MB under load | gatehouse/nginx rps | gatehouse/nginx CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, *_ in scenarios:
        for name in ("gatehouse", "nginx"):
            row = [label, name, rps_cell(opts, med(label, name, "rps"))]
            row += [f"{med(label, name, k):,.{d}f}" for k, d in (("p50", 2), ("p99", 2), ("cpu_us", 1), ("user_us", 1), ("sys_us", 1))]
            row.append(switches_cell(results, label, name))
            row += [f"{med(label, name, k):,.1f}" for k in ("rss_mb", "group_mb")]
            if name == "gatehouse":
                row.append(f"{med(label, 'gatehouse', 'rps') / med(label, 'nginx', 'rps'):.2f}x")
                cpu_ratio = med(label, "gatehouse", "cpu_us") / max(med(label, "nginx", "cpu_us"), 0.01)
                row.append(f"{cpu_ratio:.2f}x" if cpu_ratio >= 0.01 else "<0.01x")
            else:
                row += ["", ""]
            lines.append("| " + " | ".join(row) + " |")
    lines.append(
        f"| GET /api/ping straight at one backend socket (ceiling) | backend | {ceiling['rps']:,.0f} | "
        f"{ceiling['p50']:.2f} | {ceiling['p99']:.2f} | {ceiling['cpu_us']:.1f} | {ceiling['user_us']:.1f} | "
        f"{ceiling['sys_us']:.1f} | {ceiling['vcsw']:.2f} + {ceiling['ivcsw']:.2f} | {ceiling['rss_mb']:.1f} | | | |"
    )
    lines += syscall_table(calls, ("gatehouse", "nginx"), scenarios)
    table = "\n".join(lines) + "\n"
    (opts.out / "results.md").write_text(table)
    print(table)
    if cached:
        print(f"{CACHED_PATH} reached the origin {origin_hits:,} time(s) through both caches over the whole run "
              "(a fill per side, and a refresh per side each 10 minutes)")
    print(f"raw oha JSON and strace summaries in {raw}")


if __name__ == "__main__":
    main()
