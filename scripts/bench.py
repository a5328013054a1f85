#!/usr/bin/env python3
"""Benchmark gatehouse against nginx doing the same work, side by side, with oha.

One run builds a release, starts `gatehouse run` and an nginx configured to do the same work
(the same static files with gzip_static, the same backend processes over the same Unix sockets
with keepalive, the same basic auth), then drives oha with identical settings against both,
alternating, and prints a markdown table: rps, p50, p99, CPU microseconds per request of the
edge process (the gatehouse proxy; the nginx workers), peak RSS of the edge, RSS of the edge
plus the backends halfway through each run, and the gatehouse/nginx ratio. Raw oha JSON goes
to the output directory.

    scripts/bench.py            # the full run (a few minutes)
    scripts/bench.py --quick    # a short smoke run, as CI does
    scripts/bench.py --out DIR  # where the table and the raw JSON go
    scripts/bench.py --observability  # gatehouse with metrics and access logs on vs off
    scripts/bench.py --baseline OTHER --rounds 6  # this build vs another gatehouse binary

Needs oha (cargo install oha --locked), nginx, and what gatehouse itself needs.
Everything runs on loopback and stops by itself.
"""

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


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


def wait_for(url, log, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.2)
    tail = log.read_text()[-3000:] if log.exists() else ""
    sys.exit(f"bench: {url} did not come up\n{tail}")


def gatehouse_config(work, http, https, backends, admin=None, access_log="off"):
    """`admin`: the admin listener's port (None: off, and no metrics kept); `access_log`: a
    file for every route's access log ("off" for none, like the nginx side)."""
    static = work / "static"
    admin_listen = f"127.0.0.1:{admin}" if admin else "off"
    return f"""
[admin]
listen = "{admin_listen}"

[logging]
access_log = "{access_log}"

[proxy]
listen = "127.0.0.1:{http}"

[access]
# Benchmarks measure work, not throttling.
default_rate_limit = "off"

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

[[routes]]
prefix = "/"
static_dir = "{static}/main"
"""


def nginx_config(work, http, https, backends, workers):
    static = work / "static"
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
    access_log off;
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
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Request-ID $request_id;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
        location /close/ {{
            alias {static}/close/;
            allow 127.0.0.1;
            deny all;
            auth_basic "gatehouse";
            auth_basic_user_file {REPO}/conf/htpasswd;
        }}
        location / {{ root {static}/main; }}
    }}
}}
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


def measure(label, args, url, pids, out_dir, run_id, group=()):
    """`pids`: the edge processes, for CPU and peak RSS; `group`: edge and backends, whose
    RSS is taken under load."""
    before = cpu_ticks(pids)
    data, group_mb = oha(args, url, out_dir / f"{run_id}.json", group)
    after = cpu_ticks(pids)
    counts = data.get("statusCodeDistribution", {})
    served = sum(counts.values())
    ok = sum(n for code, n in counts.items() if code.startswith("2"))
    if served == 0 or ok / served < 0.99:
        sys.exit(f"bench: {label} at {url}: only {ok} of {served} responses were 2xx: {counts}")
    pct = data["latencyPercentiles"]
    return {
        "rps": data["summary"]["requestsPerSec"],
        "p50": pct["p50"] * 1000,
        "p99": pct["p99"] * 1000,
        "cpu_us": (after - before) / CLOCK_TICKS * 1e6 / served,
        "rss_mb": status_mb(pids, "VmHWM"),
        "group_mb": group_mb or 0.0,
    }


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
    pid_file = work / "nginx.pid"
    if pid_file.exists():
        os.kill(int(pid_file.read_text()), signal.SIGQUIT)
    for proc in processes:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(work, ignore_errors=True)


def start_group(binary, work, name, backends, admin, access_log):
    """Starts `gatehouse run` in its own directory under `work`; returns (process, http port,
    https port, proxy pids)."""
    home = work / name
    home.mkdir()
    http, https = free_port(), free_port()
    config = home / "gatehouse.toml"
    config.write_text(gatehouse_config(work, http, https, backends, admin, access_log or "off").replace(
        f'"{work}/run"', f'"{home}/run"').replace(f'"{work}/data"', f'"{home}/data"'))
    env = dict(os.environ, GATEHOUSE_JWT_SECRET=SECRET, RUST_LOG="warn")
    log = open(home / "gatehouse.log", "w")
    group = subprocess.Popen([binary, "run", "--config", config], env=env, stdout=log, stderr=log)
    wait_for(f"http://127.0.0.1:{http}/api/ping", home / "gatehouse.log")
    proxy = [p for p in children(group.pid) if " proxy " in cmdline(p)]
    return group, http, https, proxy


def side_by_side(opts, sides, scenarios, title, file_name):
    """Groups started side by side, one per entry of `sides` (name -> (binary, admin port or
    None, access log or "")), all with the same config otherwise; the same oha runs alternate
    between them, round after round. Writes and prints a table of medians, the first side
    against the second."""
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
        for name, (binary, admin, access_log) in sides.items():
            group, http, https, proxy = start_group(binary, work, name, 3, admin, access_log)
            processes.append(group)
            groups[name] = (http, https, proxy)
        token = login_token(next(iter(groups.values()))[0])
        base = ["-z", duration, "-c", str(connections)]
        results = {}
        for round_no in range(rounds):
            for index, (label, args, scheme, path) in enumerate(scenarios(token)):
                for name, (http, https, pids) in groups.items():
                    run_id = f"{file_name}-r{round_no}-s{index}-{name}"
                    port = http if scheme == "http" else https
                    url = f"{scheme}://127.0.0.1:{port}{path}"
                    results.setdefault((label, name), []).append(measure(label, base + args, url, pids, raw, run_id))
        logged = {name: sum(1 for _ in open(log)) for name, (_, _, log) in sides.items() if log}
    finally:
        stop_all(processes, work)

    def med(label, name, key):
        return median_of(results, label, name, key)

    a, b = list(sides)
    lines = [
        title(opts, connections, duration, rounds, logged),
        "",
        f"| scenario | rps {a} | rps {b} | {a}/{b} | p99 ms {a} | p99 ms {b} | proxy CPU us/req {a} | {b} | CPU {a}/{b} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, *_ in scenarios(token):
        ra, rb = (med(label, n, "rps") for n in (a, b))
        ca, cb = (med(label, n, "cpu_us") for n in (a, b))
        lines.append(
            f"| {label} | {ra:,.0f} | {rb:,.0f} | {ra / rb:.3f}x | {med(label, a, 'p99'):.2f} | "
            f"{med(label, b, 'p99'):.2f} | {ca:.1f} | {cb:.1f} | {ca / cb:.3f}x |"
        )
    table = "\n".join(lines) + "\n"
    (opts.out / f"{file_name}.md").write_text(table)
    print(table)


def observability(opts, binary):
    """One binary twice: metrics (admin listener) and JSON access logs to a file on one side,
    both off on the other."""
    log_dir = Path(tempfile.mkdtemp(prefix="gatehouse-bench-logs-"))
    sides = {
        "on": (binary, free_port(), str(log_dir / "access.log")),
        "off": (binary, None, ""),
    }

    def scenarios(token):
        return [
            ("static page, gzip, HTTP", ["-H", "Accept-Encoding: gzip"], "http", "/"),
            ("GET /api/ping", [], "http", "/api/ping"),
            ("GET /api/count (JWT + Redis)", ["-H", f"Authorization: Bearer {token}"], "http", "/api/count"),
        ]

    def title(opts, connections, duration, rounds, logged):
        return (
            f"`scripts/bench.py --observability{' --quick' if opts.quick else ''}`: oha -c {connections}, {duration} "
            f"per run, {rounds} round(s) alternating, medians; {os.cpu_count()} cores; 'on' = metrics kept and "
            f"scraped-ready, JSON access log to a file ({logged.get('on', 0):,} lines written); 'off' = neither."
        )

    try:
        side_by_side(opts, sides, scenarios, title, "observability")
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def baseline(opts, binary):
    """This build against another gatehouse binary (`--baseline`), same config, metrics on and
    access logs off on both: what a change costs, measured in one run."""
    sides = {"new": (binary, free_port(), ""), "base": (opts.baseline, free_port(), "")}

    def scenarios(token):
        gzip = ["-H", "Accept-Encoding: gzip"]
        return [
            ("static page, identity, HTTP", [], "http", "/"),
            ("static page, gzip, HTTP", gzip, "http", "/"),
            ("static page, identity, HTTPS", [], "https", "/"),
            ("GET /api/ping", [], "http", "/api/ping"),
            ("GET /api/ping, HTTPS", [], "https", "/api/ping"),
            ("GET /api/count (JWT + Redis)", ["-H", f"Authorization: Bearer {token}"], "http", "/api/count"),
        ]

    def title(opts, connections, duration, rounds, logged):
        return (
            f"`scripts/bench.py --baseline {opts.baseline}{' --quick' if opts.quick else ''}`: oha -c {connections}, "
            f"{duration} per run, {rounds} round(s) alternating new/base, medians; {os.cpu_count()} cores."
        )

    side_by_side(opts, sides, scenarios, title, "baseline")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "target" / "bench", help="results directory")
    parser.add_argument("--no-build", action="store_true", help="use the existing release binary")
    parser.add_argument("--observability", action="store_true",
                        help="compare gatehouse with metrics and access logs on and off")
    parser.add_argument("--baseline", type=Path,
                        help="compare this build with another gatehouse binary, alternating")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds for --observability and --baseline")
    opts = parser.parse_args()

    for tool in ("oha", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (oha: cargo install oha --locked; nginx: apt-get install nginx)")
    if not opts.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=REPO, check=True)
    binary = REPO / "target" / "release" / "gatehouse"
    if opts.observability:
        observability(opts, binary)
        return
    if opts.baseline:
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
        ports = {name: free_port() for name in ("gh_http", "gh_https", "ngx_http", "ngx_https")}
        # Metrics on (gatehouse always keeps them in production), access logs off on both sides.
        (work / "gatehouse.toml").write_text(
            gatehouse_config(work, ports["gh_http"], ports["gh_https"], backends, admin=free_port()))
        subprocess.run([binary, "cert", "--config", work / "gatehouse.toml"], check=True, capture_output=True)
        env = dict(os.environ, GATEHOUSE_JWT_SECRET=SECRET, RUST_LOG="warn")
        log = open(work / "gatehouse.log", "w")
        group = subprocess.Popen([binary, "run", "--config", work / "gatehouse.toml"], env=env, stdout=log, stderr=log)
        processes.append(group)
        wait_for(f"http://127.0.0.1:{ports['gh_http']}/api/ping", work / "gatehouse.log")
        members = children(group.pid)
        proxy = [p for p in members if " proxy " in cmdline(p)]
        backend_pids = [p for p in members if " backend " in cmdline(p)]
        backend_socket = work / "run" / "backend-1.sock"

        (work / "nginx.conf").write_text(nginx_config(work, ports["ngx_http"], ports["ngx_https"], backends, workers))
        subprocess.run(["nginx", "-c", work / "nginx.conf"], check=True)
        wait_for(f"http://127.0.0.1:{ports['ngx_http']}/api/ping", work / "nginx-error.log")
        nginx_master = int((work / "nginx.pid").read_text())
        nginx_workers = children(nginx_master)
        # The memory each side needs: its edge processes and the backends both use.
        groups = {"gatehouse": proxy + backend_pids, "nginx": [nginx_master] + nginx_workers + backend_pids}

        token = login_token(ports["gh_http"])

        base = ["-z", duration, "-c", str(connections)]
        gzip = ["-H", "Accept-Encoding: gzip"]
        scenarios = [
            ("static page, identity, HTTP", [], "http", "/"),
            ("static page, gzip, HTTP", gzip, "http", "/"),
            ("static page, identity, HTTPS", [], "https", "/"),
            ("static page, gzip, HTTPS", gzip, "https", "/"),
            ("GET /api/ping", [], "http", "/api/ping"),
            ("GET /api/count (JWT + Redis)", ["-H", f"Authorization: Bearer {token}"], "http", "/api/count"),
            ("GET /close/ (allowlist + basic auth)", ["-a", "admin:homework"], "http", "/close/"),
        ]
        servers = {
            "gatehouse": (ports["gh_http"], ports["gh_https"], proxy),
            "nginx": (ports["ngx_http"], ports["ngx_https"], nginx_workers),
        }
        results = {}
        for round_no in range(rounds):
            for index, (label, args, scheme, path) in enumerate(scenarios):
                for name, (http, https, pids) in servers.items():
                    port = http if scheme == "http" else https
                    url = f"{scheme}://127.0.0.1:{port}{path}"
                    run_id = f"r{round_no}-s{index}-{name}"
                    results.setdefault((label, name), []).append(
                        measure(label, base + args, url, pids, raw, run_id, groups[name])
                    )
        ceiling = measure(
            "ceiling", base + ["--unix-socket", str(backend_socket)], "http://localhost/api/ping",
            [p for p in members if "backend-1.sock" in cmdline(p)], raw, "ceiling",
        )
    finally:
        stop_all(processes, work)

    def med(label, name, key):
        return median_of(results, label, name, key)

    lines = [
        f"`scripts/bench.py{' --quick' if opts.quick else ''}`: oha -c {connections}, {duration} per run, "
        f"{rounds} round(s) alternating, medians; {os.cpu_count()} cores; edge = gatehouse proxy / nginx workers "
        f"({workers}); {backends} backends shared by both.",
        "",
        "| scenario | server | rps | p50 ms | p99 ms | edge CPU us/req | edge peak RSS MB | group RSS MB under load | gatehouse/nginx rps | gatehouse/nginx CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, *_ in scenarios:
        for name in ("gatehouse", "nginx"):
            row = [label, name] + [f"{med(label, name, k):,.{d}f}" for k, d in (("rps", 0), ("p50", 2), ("p99", 2), ("cpu_us", 1), ("rss_mb", 1), ("group_mb", 1))]
            if name == "gatehouse":
                row.append(f"{med(label, 'gatehouse', 'rps') / med(label, 'nginx', 'rps'):.2f}x")
                cpu_ratio = med(label, "gatehouse", "cpu_us") / max(med(label, "nginx", "cpu_us"), 0.01)
                row.append(f"{cpu_ratio:.2f}x" if cpu_ratio >= 0.01 else "<0.01x")
            else:
                row += ["", ""]
            lines.append("| " + " | ".join(row) + " |")
    lines.append(
        f"| GET /api/ping straight at one backend socket (ceiling) | backend | {ceiling['rps']:,.0f} | "
        f"{ceiling['p50']:.2f} | {ceiling['p99']:.2f} | {ceiling['cpu_us']:.1f} | {ceiling['rss_mb']:.1f} | | | |"
    )
    table = "\n".join(lines) + "\n"
    (opts.out / "results.md").write_text(table)
    print(table)
    print(f"raw oha JSON in {raw}")


if __name__ == "__main__":
    main()
