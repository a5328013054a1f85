#!/usr/bin/env python3
"""Count the gatehouse proxy's user-space instructions per request, under callgrind.

Timed benchmarks (scripts/bench.py) move by 10-20% with whatever else the machine runs; an
instruction count does not. This starts Redis and the backends natively, then the proxy alone
under `valgrind --tool=callgrind`, and for each scenario sends `oha -n SMALL` and then
`oha -n BIG` requests (after a warm-up) at a fixed rate (see `drive`), with callgrind's
counters zeroed before and dumped after each. Instructions per request =
(Ir(BIG) - Ir(SMALL)) / (BIG - SMALL): what a run costs whatever its size (connections and TLS
handshakes, the warm-up of a path) cancels out. Ir counts every thread of the proxy, in its own
code and the libraries it calls, not the kernel's work (bench.py's sys CPU and syscall counts
are for that). What ticks with time rather than with requests would count in proportion to how
slowly the machine ran: the health checks and the static files' comparison with the disk are
slowed to once an hour here, and what the proxy spends per second idle (Pingora's timer thread
wakes every 10 ms) is measured first and taken off each run in proportion to its length.

    scripts/callgrind.py                    # every scenario, this build
    scripts/callgrind.py --quick            # tiny counts, /api/ping only: a smoke run
    scripts/callgrind.py --no-build --binary A --baseline B   # two builds (see below)
    scripts/callgrind.py --baseline OTHER   # this build against another gatehouse binary
    scripts/callgrind.py --baseline target/release/gatehouse  # the same binary twice: the noise
    scripts/callgrind.py --threads 1 --baseline-threads 0     # proxy.threads 1 against default
    scripts/callgrind.py --scenarios ping,static --small 500 --big 3000 -c 2 --rate 100
    scripts/callgrind.py --nginx --floor    # beside nginx and a bare Pingora proxy (below)

`--nginx` counts nginx too, as one process (no master) with bench.py's config and no access log,
as the proxy here. `--floor` counts proxy/examples/pingora_floor.rs, a Pingora proxy with none of
gatehouse's work, twice: through Pingora's own upstream path to the backends (/api/ping and
/api/count), and answering /api/ping itself from `request_filter`; proxy/examples/hyper_floor.rs,
the same bare proxy on hyper's HTTP/1 server and client (/api/ping and /api/count); and a
backend (hyper's server, one thread) answering /api/ping on its own socket. Together they say
where the instructions per request go: what nginx needs, what Pingora needs before gatehouse
adds anything, what gatehouse adds, and what another HTTP stack needs for the same work.

Two processes of one build agree within about 2% (0.2-2.0% by path in one pair; where the
spread between processes comes from is not yet known): run the build against itself
(`--baseline` of the same binary) to see the noise of the paths a change touches, and trust
differences above it. Decide a change by these counts first and by bench.py's timed ratios
second.
Raw callgrind dumps (for callgrind_annotate) go to the output directory.

Every gatehouse side is given a config written in this checkout's shape: a baseline binary must
read that shape, so a build from before a change of the config's keys (one that refuses the file) cannot
be compared this way.

Needs valgrind, oha (cargo install oha --locked) and what gatehouse itself needs.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # importing bench.py leaves no __pycache__ among the scripts
import bench  # noqa: E402

SCENARIOS = {
    # name: (label, oha arguments, scheme, path); {token} is a logged-in user's JWT.
    "ping": ("GET /api/ping", [], "http", "/api/ping"),
    "ping-https": ("GET /api/ping, HTTPS", [], "https", "/api/ping"),
    "count": ("GET /api/count (JWT + Redis)", ["-H", "Authorization: Bearer {token}"], "http", "/api/count"),
    "static": ("static page, identity, HTTP", bench.IDENTITY, "http", "/"),
    "static-gzip": ("static page, gzip, HTTP", ["-H", "Accept-Encoding: gzip"], "http", "/"),
    "static-https": ("static page, identity, HTTPS", bench.IDENTITY, "https", "/"),
    # The routes of bench.POOL_ROUTES: a named pool over the backends' sockets (Pingora's
    # path), and a prefix rewrite without and with header rules and CORS.
    "pool-unix": ("GET ping, named pool over Unix sockets", [], "http", "/unixpool/ping"),
    "rewrite": ("GET ping, prefix rewritten", [], "http", "/plain/ping"),
    "rules": ("GET ping, prefix rewritten + header rules + CORS", ["-H", "Origin: https://app.example"], "http",
              "/rules/ping"),
}
BACKENDS = 2


def side_config(work, name, threads, redis_socket):
    """A config of its own per side (its ports and threads), with the runtime directory, and so
    the backend sockets, shared. Returns (file, http port, https port)."""
    http, https = bench.free_port(), bench.free_port()
    # The TCP pool's origin is never started here: no scenario sends to it.
    text = bench.gatehouse_config(work, http, https, BACKENDS, proxy_extra=bench.threads_line(threads),
                                  sections=bench.pool_sections(work, BACKENDS, 9), routes=bench.POOL_ROUTES)
    text += f"""
[redis]
url = "unix://{redis_socket}"

[upstream]
# Health checks tick with time, not with requests: out of the count.
health_check_interval = "1h"

[static]
# So does comparing a held file with the disk (a stat on a blocking thread, once a second).
check_interval = "1h"
"""
    config = work / f"{name}.toml"
    config.write_text(text)
    return config, http, https


def callgrind_total(dump):
    """The instructions a callgrind dump file counts."""
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    sys.exit(f"callgrind: no totals in {dump}")


def answers_on_socket(path):
    """Whether GET /api/ping answers 200 now on the Unix socket `path` (urllib has no Unix
    sockets)."""
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(5)
            conn.connect(str(path))
            conn.sendall(b"GET /api/ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return conn.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class Counted:
    """A process running under callgrind, whose counters are zeroed and dumped on demand:
    `command` is what valgrind runs; `ready` a URL that answers 200 once it serves, or the Unix
    socket on which GET /api/ping will."""

    def __init__(self, command, ready, out_dir, name, env):
        self.out_dir, self.name = out_dir, name
        self.log = out_dir / f"{name}-valgrind.log"
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/{name}.callgrind.%p",
             *map(str, command)],
            env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
        )
        try:
            answers = answers_on_socket if isinstance(ready, Path) else bench.answers_200
            bench.wait_for(ready, self.log, timeout=180, proc=self.proc, answers=answers)
        except SystemExit:
            # Not yet among the processes the caller stops.
            self.proc.kill()
            raise
        self.dumps = 0

    def control(self, flag):
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], check=True, capture_output=True)

    def count(self, run):
        """(Instructions, seconds) of `run()`. Zeroing and dumping take a moment each, the same
        for every run, so the differences of two runs' figures are exact."""
        self.control("-z")
        started = time.monotonic()
        run()
        seconds = time.monotonic() - started
        self.control("-d")
        self.dumps += 1
        return callgrind_total(self.out_dir / f"{self.name}.callgrind.{self.proc.pid}.{self.dumps}"), seconds

    def idle_rate(self):
        """Instructions per second spent with no request at all: Pingora's timer thread, which
        wakes every 10 ms whatever the load. Measured once start-up work is over (a backend
        seeds Redis as it starts answering): when a second and the cheapest second before it cost
        alike, within 10% and 10,000 instructions either way."""
        short, short_seconds = self.count(lambda: time.sleep(1))
        cheapest = short
        for _ in range(60):
            short, short_seconds = self.count(lambda: time.sleep(1))
            if short <= 1.1 * cheapest + 10_000 and cheapest <= 1.1 * short + 10_000:
                break
            cheapest = min(cheapest, short)
        else:
            print(f"callgrind: {self.name}: idle seconds never settled (last {short:,} Ir); "
                  "its idle rate is a guess", file=sys.stderr)
        long, long_seconds = self.count(lambda: time.sleep(4))
        return (long - short) / (long_seconds - short_seconds)

    def stop(self):
        # SIGINT: the fast shutdown, without the grace period's idle ticks.
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def drive(opts, requests, args, url, label, out_file):
    """`requests` at `--rate` per second: Pingora files each timeout in a 10 ms slot of its timer
    wheel, and requests that share a slot share its cost, so the instructions per request
    depend on the rate. A rate well under what the proxy manages under callgrind (a few
    hundred a second) keeps it the same for every run, however fast the machine."""
    rate = ["-q", str(opts.rate)] if opts.rate else []
    data, _ = bench.oha(["-n", str(requests), "-c", str(opts.connections), *rate, *args], url, out_file)
    served = bench.served_ok(data, label, url)
    if served != requests:
        sys.exit(f"callgrind: {label}: {served} responses to {requests} requests")


def measure_side(opts, name, proxy, http, https, unix, scenarios, token):
    """({scenario: Ir per request}, idle Ir per second, token) for one edge, `proxy` (a
    Counted), on its ports or, given `unix`, on that socket; logs in (through it) unless
    given a token.

    A run under callgrind takes many times longer than without, and what the proxy spends
    per second of wall time (its idle rate) would count in proportion to how slowly the machine
    ran that run; so each run's idle share (idle rate x its seconds) is taken off."""
    found = {}
    try:
        token = token or bench.login_token(http)
        idle = proxy.idle_rate()
        for key in scenarios:
            label, args, scheme, path = SCENARIOS[key]
            args = [a.replace("{token}", token) for a in args]
            url = f"{scheme}://127.0.0.1:{http if scheme == 'http' else https}{path}"
            if unix:
                args, url = ["--unix-socket", str(unix), *args], f"http://localhost{path}"
            raw = opts.out / "raw"
            drive(opts, opts.warmup, args, url, label, raw / f"{name}-{key}-warmup.json")
            small, small_seconds = proxy.count(
                lambda: drive(opts, opts.small, args, url, label, raw / f"{name}-{key}-small.json"))
            big, big_seconds = proxy.count(
                lambda: drive(opts, opts.big, args, url, label, raw / f"{name}-{key}-big.json"))
            busy = (big - idle * big_seconds) - (small - idle * small_seconds)
            found[key] = busy / (opts.big - opts.small)
            print(f"callgrind: {name} {label}: {found[key]:,.0f} Ir/request (uncorrected "
                  f"{(big - small) / (opts.big - opts.small):,.0f}; runs of {small_seconds:.0f} s and "
                  f"{big_seconds:.0f} s; idle {idle:,.0f} Ir/s)", file=sys.stderr)
    finally:
        proxy.stop()
    return found, idle, token


# What the other sides of --nginx and --floor serve of SCENARIOS. nginx is given every route
# (bench.nginx_config). The Pingora floor proxies every path to the backends, so only the
# backends' own paths; answering, it answers any path alike, so once. The bare proxy on hyper
# goes to a backend too; the backend itself is asked on its own socket.
FLOOR_SCENARIOS = {"pingora": ["ping", "count"], "pingora-answer": ["ping"], "hyper": ["ping", "count"],
                   "backend": ["ping"]}
EXAMPLES = bench.REPO / "target" / "release" / "examples"


def start_edge(opts, kind, name, work, binary, threads, redis_socket):
    """(Counted, http port, https port, Unix socket or None) of one side under callgrind."""
    env = dict(os.environ, RUST_LOG="warn")
    env.pop(bench.SECRET_ENV, None)
    if kind == "gatehouse":
        config, http, https = side_config(work, name, threads, redis_socket)
        command = [binary, "proxy", "--config", config]
        return Counted(command, f"http://127.0.0.1:{http}/healthz", opts.out, name, env), http, https, None
    if kind == "backend":
        path = work / "run" / f"{name}.sock"
        command = [binary, "backend", "--config", work / "backends.toml", "--socket", path, "--id", name]
        env[bench.SECRET_ENV] = bench.SECRET
        return Counted(command, path, opts.out, name, env), None, None, path
    http, https = bench.free_port(), bench.free_port()
    if kind == "nginx":
        # No master and no fork: one process holds all the work, the one callgrind_control zeroes
        # and dumps (worker_processes is then ignored).
        config = work / f"{name}.conf"
        config.write_text(bench.nginx_config(work, http, https, BACKENDS, 1))
        command = ["nginx", "-c", config, "-g", "daemon off; master_process off;"]
    elif kind == "hyper":
        # Each client connection keeps one upstream connection of its own: nothing to balance.
        command = [EXAMPLES / "hyper_floor", "--listen", f"127.0.0.1:{http}", "--upstream",
                   work / "run" / "backend-1.sock"]
    else:
        command = [EXAMPLES / "pingora_floor", "--listen", f"127.0.0.1:{http}", "--threads",
                   str(threads or os.cpu_count())]
        if kind == "pingora-answer":
            command.append("--answer")
        else:
            for i in range(1, BACKENDS + 1):
                command += ["--upstream", work / "run" / f"backend-{i}.sock"]
    return Counted(command, f"http://127.0.0.1:{http}/api/ping", opts.out, name, env), http, https, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, /api/ping only (a smoke run)")
    parser.add_argument("--no-build", action="store_true", help="use the existing release binary")
    parser.add_argument("--out", type=Path, default=bench.REPO / "target" / "callgrind",
                        help="results directory")
    parser.add_argument("--binary", type=Path, default=bench.REPO / "target" / "release" / "gatehouse",
                        help="the gatehouse binary counted (default: this build's release)")
    parser.add_argument("--baseline", type=Path, help="another gatehouse binary to count against this build")
    parser.add_argument("--threads", type=int, help="proxy.threads of this build's proxy")
    parser.add_argument("--baseline-threads", type=int,
                        help="proxy.threads of the baseline's proxy (alone: this build against itself)")
    parser.add_argument("--nginx", action="store_true",
                        help="count nginx too (one process, bench.py's config, access log off as here)")
    parser.add_argument("--floor", action="store_true",
                        help="count bare proxies too: proxy/examples/pingora_floor.rs (Pingora's upstream path, "
                             "and answering without one), proxy/examples/hyper_floor.rs (hyper), and a "
                             "backend (hyper) answering on its own socket")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--small", type=int, default=500, help="requests of the small run")
    parser.add_argument("--big", type=int, default=3000, help="requests of the big run")
    parser.add_argument("--warmup", type=int, default=100, help="requests before counting, per scenario")
    parser.add_argument("--rate", type=int, default=100,
                        help="requests per second offered (oha -q; 0: as fast as the proxy answers)")
    parser.add_argument("-c", "--connections", type=int, default=2, help="oha's concurrent connections")
    opts = parser.parse_args()
    if opts.quick:
        opts.scenarios, opts.small, opts.big, opts.warmup = "ping", 50, 250, 20
    scenarios = opts.scenarios.split(",")
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or opts.big <= opts.small:
        sys.exit(f"callgrind: unknown scenarios {unknown}" if unknown else "callgrind: --big must exceed --small")
    for tool in ("valgrind", "callgrind_control", "oha", "redis-server") + (("nginx",) if opts.nginx else ()):
        if not shutil.which(tool):
            sys.exit(f"callgrind: {tool} not found (oha: cargo install oha --locked; the rest: apt-get install)")
    if not opts.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=bench.REPO, check=True)
        if opts.floor:
            subprocess.run(["cargo", "build", "--release", "--locked", "--workspace", "--bins", "--example",
                            "pingora_floor", "--example", "hyper_floor"], cwd=bench.REPO, check=True)
    missing = [name for name in ("pingora_floor", "hyper_floor") if opts.floor and not (EXAMPLES / name).exists()]
    if missing:
        sys.exit(f"callgrind: {', '.join(missing)} not built (cargo build --release --workspace "
                 "--example pingora_floor --example hyper_floor)")
    binary = opts.binary
    # name: (kind, binary, proxy.threads, its scenarios)
    sides = {"new": ("gatehouse", binary, opts.threads, scenarios)}
    if opts.baseline or opts.baseline_threads is not None:
        base_threads = opts.threads if opts.baseline_threads is None else opts.baseline_threads
        sides["base"] = ("gatehouse", opts.baseline or binary, base_threads, scenarios)
    if opts.nginx:
        sides["nginx"] = ("nginx", None, None, scenarios)
    if opts.floor:
        for kind, served in FLOOR_SCENARIOS.items():
            mine = [s for s in scenarios if s in served]
            if mine:
                sides[kind] = (kind, binary if kind == "backend" else None, opts.threads, mine)
            else:
                print(f"callgrind: {kind} serves none of these scenarios; not counted", file=sys.stderr)
    (opts.out / "raw").mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="gatehouse-callgrind-"))
    processes = []
    results, idles = {}, {}
    try:
        bench.copy_static(work)
        (work / "run").mkdir()
        redis_socket = work / "run" / "redis.sock"
        processes.append(subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(redis_socket), "--save", "",
             "--appendonly", "no", "--loglevel", "warning"],
            stdout=open(work / "redis.log", "w"), stderr=subprocess.STDOUT,
        ))
        first_config = side_config(work, "backends", None, redis_socket)[0]
        subprocess.run([binary, "cert", "--config", first_config], check=True, capture_output=True)
        # The backends are this build's for every side: what they answer is the same to each edge.
        env = dict(os.environ, **{bench.SECRET_ENV: bench.SECRET}, RUST_LOG="warn")
        for i in range(1, BACKENDS + 1):
            processes.append(subprocess.Popen(
                [binary, "backend", "--config", first_config, "--socket", str(work / "run" / f"backend-{i}.sock"),
                 "--id", f"b{i}"],
                env=env, stdout=open(work / f"backend-{i}.log", "w"), stderr=subprocess.STDOUT,
            ))
        token = None
        for name, (kind, side_binary, threads, served) in sides.items():
            edge, http, https, unix = start_edge(opts, kind, name, work, side_binary, threads, redis_socket)
            results[name], idles[name], token = measure_side(opts, name, edge, http, https, unix, served, token)
    finally:
        for proc in processes:
            proc.send_signal(signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    table = results_table(opts, sides, scenarios, results, idles)
    (opts.out / "results.md").write_text(table)
    print(table)


def results_table(opts, sides, scenarios, results, idles):
    """Ir per request by scenario and side, with new/base where a baseline ran, new/pingora
    where the floor ran and each side against nginx where nginx ran."""
    names = list(sides)

    def about(name):
        kind, path, threads, _ = sides[name]
        if kind == "gatehouse":
            return f"{name} = {path} (proxy.threads {bench.threads_words(threads)})"
        if kind == "nginx":
            return f"{name} = nginx, one process"
        if kind == "backend":
            return f"{name} = a gatehouse backend (hyper, one thread) on its own socket"
        if kind == "hyper":
            return f"{name} = proxy/examples/hyper_floor.rs (one thread, to one backend)"
        return f"{name} = proxy/examples/pingora_floor.rs (threads {threads or os.cpu_count()}" + (
            ", answering itself)" if kind == "pingora-answer" else ", to the backends)")

    ratios = [("new", "base")] if "base" in sides else []
    if "pingora" in sides:
        ratios.append(("new", "pingora"))
    if "nginx" in sides:
        ratios += [(name, "nginx") for name in names if name != "nginx"]
    lines = [
        f"`scripts/callgrind.py{''.join(f' {arg}' for arg in sys.argv[1:])}`: edge instructions (Ir) per "
        f"request = (Ir of {opts.big:,} requests - Ir of {opts.small:,}) / {opts.big - opts.small:,}, "
        f"oha -c {opts.connections} -q {opts.rate}, each run's idle share taken off (idle Ir/s: "
        + ", ".join(f"{n} {idles[n]:,.0f}" for n in names) + "); " + ", ".join(map(about, names)) + ".",
        "",
        "| scenario | " + " | ".join(f"Ir/req {n}" for n in names)
        + "".join(f" | {a}/{b}" for a, b in ratios) + " |",
        "|---" * (len(names) + 1 + len(ratios)) + "|",
    ]
    for key in scenarios:
        row = [SCENARIOS[key][0]] + [f"{results[n][key]:,.0f}" if key in results[n] else "-" for n in names]
        for a, b in ratios:
            both = key in results[a] and key in results[b]
            row.append(f"{results[a][key] / results[b][key]:.4f}x" if both else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
