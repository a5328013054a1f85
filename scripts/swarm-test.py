#!/usr/bin/env python3
"""The Swarm stack for real: build the images, deploy compose.yaml, then change and break it
under load, counting every response.

    scripts/swarm-test.py             # needs a Docker daemon; skips without one (fails under CI=...)
    scripts/swarm-test.py --no-build  # take target/release/gatehouse as it is

Steps (each a row of the table printed at the end: requests sent, failed, seconds):

- first, ports 80 and 443 must be free (the stack publishes them): when anything listens
  there (an nginx that apt started, say), the test stops and names it, and stops nothing;
- scripts/image.sh, `docker swarm init` if this node is in no Swarm (it leaves the Swarm at
  the end only then, and notes in target/swarm-test-swarm.json meanwhile that it made it,
  so a run that was killed has its Swarm removed by the next run), scripts/make-secrets.sh,
  `docker stack deploy -c compose.yaml`. A node in a Swarm of more than one node, or a
  worker, is refused: the stack would spread to other machines;
- the README's curl walkthrough through the published ports 80 and 443: ping, login, counts,
  401 without a token, the HTTP redirect, /close/ refused to an address not allowlisted;
- the containers as compose.yaml makes them: the edge cannot write in the socket volume nor
  reach Redis (it is not on the `redis` network), a backend reaches Redis, and no setuid or
  setgid file is in the image;
- every backend replica answers (`X-Backend-Id` is each backend container's host name), the
  visit count is one count across them, and a logout holds on every one;
- a client in a network namespace of its own (a veth pair the test makes) is seen with its own
  address: /close/'s allowlist refuses it, the edge's access log names it, and past its burst
  it gets 429s while this machine's requests are served;
- `docker service scale` up and down, `docker service update --force`, an image change:
  no request fails;
- a backend container killed (`docker kill`): only requests in flight to it may fail (at most
  one per load client), and Swarm replaces it;
- Redis stopped: /api/count answers 503 while it is down, then the count resumes from its
  persisted value;
- the edge container killed: requests fail until Swarm has restarted it (the outage is
  measured), then service resumes;
- `docker stack rm` leaves no container, network, secret or config of the stack;
- when Debian's `docker-compose` (v1) is installed, the same file on one host:
  `docker-compose --compatibility -p gatehouse-compose-test -f compose.yaml up -d`, the
  README walkthrough through it, `down -v` (skipped without docker-compose).

Load: a few client threads on HTTP/1.1 keep-alive over HTTPS to 127.0.0.1:443 send
/api/ping all along, below the container config's per-client rate limit (every client here
is one address to the edge: the Docker gateway's). A client resends a request once when a
kept-alive connection turns out closed before any answer, as HTTP libraries do; those are
counted apart. Everything targets this machine's loopback, and every wait has a deadline.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STACK = "gatehouse-test"
EDGE, BACKEND, REDIS = f"{STACK}_edge", f"{STACK}_backend", f"{STACK}_redis"
NEXT_TAG = "gatehouse:swarm-test-next"
COMPOSE_V1 = ["docker-compose", "--compatibility", "-p", "gatehouse-compose-test", "-f", "compose.yaml"]
# Present while a Swarm this test initialised is up; see left_swarm().
SWARM_MARKER = REPO / "target" / "swarm-test-swarm.json"
# A client of its own: a network namespace joined to this machine by a veth pair, on
# addresses of the test's own (RFC 5737's documentation range, routed nowhere else).
NETNS, VETH_HOST, VETH_CLIENT = "gatehouse-swarm-client", "ghswarm0", "ghswarm1"
HOST_ADDR, CLIENT_ADDR = "198.51.100.1", "198.51.100.2"
CLIENTS = 3
# Each client's pause between requests. Every request from this machine reaches the edge from
# one address (the Docker gateway's), which the container config allows 20 requests/s (burst
# 40): 3 clients at under 3.3/s each, and the checks' requests paced at under 7/s, stay below.
PAUSE_S = 0.3
CHECK_PAUSE_S = 0.15
TIMEOUT_S = 10.0
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def sh(*cmd, check=True, capture=True, timeout=600):
    run = subprocess.run(
        cmd, cwd=REPO, text=True, timeout=timeout,
        stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None,
    )
    if check and run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {run.returncode}: {run.stdout}")
    return (run.stdout or "").strip()


def wait_for(what, check, timeout=120.0, every=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as error:  # noqa: BLE001 - keep trying until the deadline
            last = error
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def request(method, path, port=443, headers=None, body=None, tls=True):
    """One request on a connection of its own: (status, headers, body)."""
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT_S, context=CTX)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Load:
    """Client threads sending /api/ping; every outcome is counted under the current step."""

    def __init__(self):
        self.lock = threading.Lock()
        self.step = "idle"
        self.counts = {}  # step -> {"sent", "failed", "resent", "causes": {}}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]

    def begin(self, step):
        with self.lock:
            self.step = step
            self.counts.setdefault(step, {"sent": 0, "failed": 0, "resent": 0, "causes": {}})

    def note(self, step, failure, resent):
        with self.lock:
            c = self.counts.setdefault(step, {"sent": 0, "failed": 0, "resent": 0, "causes": {}})
            c["sent"] += 1
            c["resent"] += resent
            if failure:
                c["failed"] += 1
                c["causes"][failure] = c["causes"].get(failure, 0) + 1

    def client(self):
        conn = None
        while not self.stop.is_set():
            with self.lock:
                step = self.step
            failure, resent = None, 0
            for attempt in range(2):
                reused = conn is not None
                try:
                    if conn is None:
                        conn = http.client.HTTPSConnection(
                            "127.0.0.1", 443, timeout=TIMEOUT_S, context=CTX)
                    conn.request("GET", "/api/ping")
                    resp = conn.getresponse()
                    resp.read()
                    failure = None if resp.status == 200 else f"status {resp.status}"
                    if resp.getheader("connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    break
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as error:
                    conn.close()
                    conn = None
                    failure = type(error).__name__
                    # A kept-alive connection closed before any answer: send again, once.
                    if reused and attempt == 0:
                        resent = 1
                        continue
                    break
                except (OSError, http.client.HTTPException) as error:
                    if conn is not None:
                        conn.close()
                    conn = None
                    failure = type(error).__name__
                    break
            self.note(step, failure, resent)
            time.sleep(PAUSE_S)

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            if t.is_alive():
                t.join(timeout=TIMEOUT_S + 2)


def containers(service, state="running"):
    out = sh("docker", "ps", "-q", "--no-trunc", "--filter", f"label=com.docker.swarm.service.name={service}",
             "--filter", f"status={state}")
    return out.split()


def healthy_backend_ids():
    """Host names (12-character container ids) of the backend containers that are healthy."""
    ids = []
    for cid in containers(BACKEND):
        health = sh("docker", "inspect", "-f", "{{.State.Health.Status}}", cid, check=False)
        if health == "healthy":
            ids.append(cid[:12])
    return set(ids)


def converged(service, replicas):
    """The service runs `replicas` healthy tasks and no other container."""
    def check():
        running = containers(service)
        return len(running) == replicas and len(healthy_backend_ids()) == replicas
    return check


def answering_ids(token, want, tries=200):
    """Backend ids seen on /api/count until `want` are all seen; with the visits counted."""
    seen, visits = set(), []
    for _ in range(tries):
        status, headers, body = request("GET", "/api/count", headers={"Authorization": f"Bearer {token}"})
        if status != 200:
            raise RuntimeError(f"/api/count: {status} {body!r}")
        seen.add(headers.get("x-backend-id"))
        visits.append(json.loads(body)["visits"])
        if want <= seen:
            break
        time.sleep(CHECK_PAUSE_S)
    return seen, visits


def login():
    password = (REPO / "secrets" / "admin_password").read_text().strip()
    status, _, body = request("POST", "/auth/login", headers={"Content-Type": "application/json"},
                              body=json.dumps({"username": "admin", "password": password}))
    if status != 200:
        raise RuntimeError(f"login: {status} {body!r}")
    return json.loads(body)["token"]


def count(token):
    status, headers, body = request("GET", "/api/count", headers={"Authorization": f"Bearer {token}"})
    return status, headers, (json.loads(body).get("visits") if status == 200 else None)


def client_namespace(up):
    """Makes (or removes) the client's namespace and its veth pair."""
    sh("ip", "netns", "del", NETNS, check=False)
    sh("ip", "link", "del", VETH_HOST, check=False)
    if not up:
        return
    sh("ip", "netns", "add", NETNS)
    sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_CLIENT)
    sh("ip", "link", "set", VETH_CLIENT, "netns", NETNS)
    sh("ip", "addr", "add", f"{HOST_ADDR}/30", "dev", VETH_HOST)
    sh("ip", "link", "set", VETH_HOST, "up")
    sh("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{CLIENT_ADDR}/30", "dev", VETH_CLIENT)
    sh("ip", "netns", "exec", NETNS, "ip", "link", "set", VETH_CLIENT, "up")
    sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")


def from_client(path, count=1):
    """`count` requests on one keep-alive connection from the namespace: their statuses."""
    urls = [arg for _ in range(count) for arg in ("-o", "/dev/null", f"https://{HOST_ADDR}{path}")]
    out = sh("ip", "netns", "exec", NETNS, "curl", "-sk", "-w", "%{http_code}\\n",
             "--max-time", "20", *urls, check=False)
    return [int(code) for code in out.split() if code.isdigit()]


def containers_v1(service):
    return sh("docker", "ps", "-q", "--filter", "label=com.docker.compose.project=gatehouse-compose-test",
              "--filter", f"label=com.docker.compose.service={service}").split()


def stack_leftovers():
    label = f"com.docker.stack.namespace={STACK}"
    found = {}
    for kind, cmd in [
        ("container", ["docker", "ps", "-aq", "--filter", f"label={label}"]),
        ("network", ["docker", "network", "ls", "-q", "--filter", f"label={label}"]),
        ("secret", ["docker", "secret", "ls", "-q", "--filter", f"label={label}"]),
        ("config", ["docker", "config", "ls", "-q", "--filter", f"label={label}"]),
        ("service", ["docker", "service", "ls", "-q", "--filter", f"label={label}"]),
    ]:
        out = sh(*cmd, check=False)
        if out:
            found[kind] = len(out.split())
    return found


def port_holders(port):
    """What listens on TCP `port` on any address of this machine: process names and pids as
    `ss` shows them, or the Docker container publishing it."""
    holders = []
    out = sh("ss", "-Hltnp", f"sport = :{port}", check=False)
    for line in out.splitlines():
        users = re.findall(r'\("([^"]+)",pid=(\d+)', line)
        holders += [f"{name} (pid {pid})" for name, pid in users] or [line.split()[3] if len(line.split()) > 3 else line]
    for name in sh("docker", "ps", "--filter", f"publish={port}", "--format", "{{.Names}}", check=False).split():
        holders.append(f"container {name}")
    with socket.socket() as s:
        if not holders and s.connect_ex(("127.0.0.1", port)) == 0:
            holders.append("an unknown listener on 127.0.0.1")
    return sorted(set(holders))


def left_swarm():
    """Removes the Swarm a killed run of this test initialised (and its stack), as that run
    would have at its end; returns what it found."""
    if not SWARM_MARKER.exists():
        return None
    try:
        marker = json.loads(SWARM_MARKER.read_text())
    except (OSError, ValueError):
        marker = {}
    state = sh("docker", "info", "-f", "{{.Swarm.LocalNodeState}}", check=False)
    if state == "active":
        log(f"a Swarm initialised by an earlier run (pid {marker.get('pid')}, {marker.get('at')}) is still up: removing it")
        sh("docker", "stack", "rm", STACK, check=False)
        try:
            wait_for("the stack to go", lambda: not stack_leftovers(), timeout=120)
        except RuntimeError as error:
            log(error)
        sh("docker", "swarm", "leave", "--force", check=False)
        if not marker.get("gwbridge_was", True):
            sh("docker", "network", "rm", "docker_gwbridge", check=False)
    SWARM_MARKER.unlink(missing_ok=True)
    return state


def swarm_refusal():
    """Why this node must not run the test, or None."""
    info = json.loads(sh("docker", "info", "-f", "{{json .Swarm}}"))
    if info.get("LocalNodeState") != "active":
        return None
    if not info.get("ControlAvailable"):
        return "this node is a worker of a Swarm: the test needs a manager of a one-node Swarm (or no Swarm)"
    nodes = info.get("Nodes") or 0
    if nodes > 1:
        return (f"this node is in a Swarm of {nodes} nodes: the test's stack would run on the others too "
                "(an edge on each, binding its ports 80 and 443). Run it on a machine in no Swarm, or "
                "alone in its Swarm")
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-build", action="store_true", help="take target/release/gatehouse as it is")
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args()

    if subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        if os.environ.get("CI"):
            print("swarm test: no Docker daemon answers, and CI requires this test", file=sys.stderr)
            return 1
        print("swarm test: skipped, no Docker daemon answers")
        return 0

    # A Swarm (and stack) a killed run left is this test's own: removed first, since its edge
    # holds ports 80 and 443.
    left_swarm()
    # Before anything is built or started: the stack binds these, and nothing else that holds
    # them is this test's to stop.
    taken = {port: holders for port in (80, 443) if (holders := port_holders(port))}
    if taken:
        for port, holders in taken.items():
            print(f"swarm test: port {port} is taken by {', '.join(holders)}; the stack publishes it",
                  file=sys.stderr)
        print("swarm test: free ports 80 and 443 first (e.g. `systemctl stop nginx` for an nginx apt "
              "started); the test stops nothing it did not start", file=sys.stderr)
        return 1
    refusal = swarm_refusal()
    if refusal:
        print(f"swarm test: refused: {refusal}", file=sys.stderr)
        return 1

    rows = []  # (step, sent, failed, seconds, note)
    load = Load()
    swarm_was = sh("docker", "info", "-f", "{{.Swarm.LocalNodeState}}")
    # `docker swarm init` makes this bridge, and leaving the Swarm keeps it.
    gwbridge_was = sh("docker", "network", "ls", "-q", "--filter", "name=^docker_gwbridge$")
    started_swarm = False
    failures = []

    def timed(step, action, note=""):
        load.begin(step)
        t0 = time.monotonic()
        extra = action()
        seconds = time.monotonic() - t0
        c = load.counts.get(step, {"sent": 0, "failed": 0})
        rows.append((step, c["sent"], c["failed"], seconds, extra or note))
        log(f"{step}: {c['sent']} sent, {c['failed']} failed, {seconds:.1f} s {extra or note}")
        return c

    def expect(ok, message):
        if not ok:
            failures.append(message)
            log("FAILED:", message)

    try:
        t0 = time.monotonic()
        sh("scripts/image.sh", *(["--no-build"] if args.no_build else []), capture=False, timeout=1800)
        rows.append(("scripts/image.sh", 0, 0, time.monotonic() - t0, ""))
        env_lines = (REPO / "target" / "images.env").read_text().split()
        env = dict(line.split("=", 1) for line in env_lines)
        os.environ.update(env)
        os.environ["GATEHOUSE_REPLICAS"] = str(args.replicas)

        if swarm_was != "active":
            # Written first: a run killed during the init still has its Swarm removed next time.
            SWARM_MARKER.parent.mkdir(exist_ok=True)
            SWARM_MARKER.write_text(json.dumps({
                "pid": os.getpid(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "gwbridge_was": bool(gwbridge_was)}))
            started_swarm = True
            sh("docker", "swarm", "init")
        sh("scripts/make-secrets.sh")

        def deploy():
            sh("docker", "stack", "deploy", "-c", "compose.yaml", STACK)
            wait_for("the backends", converged(BACKEND, args.replicas), timeout=180)
            wait_for("the edge", lambda: request("GET", "/api/ping")[0] == 200, timeout=120)
            # Redis too: a login works (paced below the login rate limit, 1/s).
            wait_for("a login", login, timeout=60, every=1.5)
        timed("docker stack deploy", deploy)
        load.start()

        def walkthrough():
            status, _, body = request("GET", "/api/ping")
            expect((status, body) == (200, b'{"status":"ok"}'), f"ping: {status} {body!r}")
            token = login()
            visits = [count(token)[2] for _ in range(3)]
            expect(visits == [visits[0], visits[0] + 1, visits[0] + 2], f"three counts: {visits}")
            status, headers, _ = request("GET", "/api/count")
            expect(status == 401 and headers.get("www-authenticate") == "Bearer", f"no token: {status}")
            status, headers, _ = request("GET", "/open/?page=2", port=80, tls=False)
            expect(status == 301 and headers.get("location") == "https://127.0.0.1/open/?page=2",
                   f"redirect: {status} {headers.get('location')}")
            # This machine reaches the edge from a Docker gateway address, which the
            # container config does not allowlist.
            status, _, _ = request("GET", "/close/", headers={"Authorization": "Basic YWRtaW46aG9tZXdvcms="})
            expect(status == 403, f"/close/ from a Docker gateway address: {status}")
            return f"counts {visits}"
        timed("README walkthrough", walkthrough)

        def containers_as_made():
            edge, backend = containers(EDGE)[0], containers(BACKEND)[0]
            tcp = "exec 3<>/dev/tcp/redis/6379 && printf 'PING\\r\\n' >&3 && head -c 7 <&3"
            wrote = sh("docker", "exec", edge, "touch", "/app/var/backends/.edge-write-test", check=False)
            expect("Read-only file system" in wrote, f"the edge wrote in the socket volume: {wrote!r}")
            reached = sh("docker", "exec", edge, "timeout", "5", "bash", "-c", tcp, check=False)
            expect("PONG" not in reached, f"the edge reached Redis: {reached!r}")
            # Reached, and a password is required.
            reached = sh("docker", "exec", backend, "timeout", "5", "bash", "-c", tcp, check=False)
            expect("-NOAUTH" in reached, f"a backend's PING without a password: {reached!r}")
            # The image, searched as root (a container of the stack has no capability to read
            # every directory).
            setuid = sh("docker", "run", "--rm", "--user", "0", "--entrypoint", "find", env["GATEHOUSE_IMAGE"],
                        "/", "-xdev", "-type", "f", "-perm", "/6000", check=False)
            expect(setuid == "", f"setuid/setgid files in the image: {setuid!r}")
            nnp = sh("docker", "exec", backend, "awk", "/^NoNewPrivs/ {print $2}", "/proc/1/status", check=False)
            return (f"edge: socket volume read-only, Redis unreachable; backend: Redis answers NOAUTH "
                    f"without the password; no setuid file; NoNewPrivs {nnp}")
        timed("containers as compose.yaml makes them", containers_as_made)

        token = login()

        def every_replica():
            want = healthy_backend_ids()
            seen, visits = answering_ids(token, want)
            expect(seen == want, f"backend ids {sorted(seen)} vs containers {sorted(want)}")
            expect(visits == list(range(visits[0], visits[0] + len(visits))), f"one count: {visits}")
            # A logout is refused by every backend afterwards.
            extra = login()
            status, _, _ = request("POST", "/auth/logout", headers={"Authorization": f"Bearer {extra}"})
            expect(status in (200, 204), f"logout: {status}")
            refused = set()
            for _ in range(60):
                status, headers, _ = request("GET", "/api/count", headers={"Authorization": f"Bearer {extra}"})
                expect(status == 401, f"a logged-out token: {status}")
                refused.add(headers.get("x-backend-id"))
                if want <= refused:
                    break
                time.sleep(CHECK_PAUSE_S)
            expect(want <= refused, f"logout seen by {sorted(refused)} of {sorted(want)}")
            return f"{len(seen)} ids, {len(visits)} counts in sequence"
        timed("every replica answers", every_replica)

        def own_client():
            client_namespace(True)
            # The edge sees the namespace's own address: the allowlist refuses it, by its
            # address (the access log says so) ...
            status = from_client("/close/")
            expect(status == [403], f"/close/ from {CLIENT_ADDR}: {status}")
            try:
                # Access logs are written in batches, and reach `docker service logs` after.
                wait_for(f"{CLIENT_ADDR} in the edge's access log", lambda: CLIENT_ADDR in sh(
                    "docker", "service", "logs", "--raw", "--since", "5m", EDGE, check=False), timeout=20)
            except RuntimeError as error:
                expect(False, str(error))
            # ... and its rate limit is its own: past its burst it gets 429s, while the
            # load's address is served throughout.
            burst = from_client("/api/ping", count=80)
            limited = burst.count(429)
            expect(len(burst) == 80 and limited > 0, f"80 pings from {CLIENT_ADDR}: {limited} refused")
            host = [request("GET", "/api/ping")[0] for _ in range(3)]
            expect(host == [200, 200, 200], f"pings from this machine meanwhile: {host}")
            client_namespace(False)
            return f"{CLIENT_ADDR}: /close/ 403, {limited} of 80 pings 429"
        timed("a client in its own network namespace", own_client)

        def scale(n):
            def action():
                sh("docker", "service", "scale", "--detach", f"{BACKEND}={n}")
                wait_for(f"{n} backends", converged(BACKEND, n), timeout=180)
                seen, _ = answering_ids(token, healthy_backend_ids())
                expect(len(seen) == n, f"after scale to {n}: {len(seen)} ids answer")
                time.sleep(3)
            return action
        timed(f"scale backend to {args.replicas + 2}", scale(args.replicas + 2))
        timed(f"scale backend to {args.replicas - 1}", scale(args.replicas - 1))
        timed(f"scale backend to {args.replicas}", scale(args.replicas))

        def update(*how):
            def action():
                before = healthy_backend_ids()
                sh("docker", "service", "update", "--quiet", *how, BACKEND, timeout=600)
                def replaced():
                    ids = healthy_backend_ids()
                    return ids if len(ids) == args.replicas and not ids & before else None
                after = wait_for("the update", replaced, timeout=180)
                seen, _ = answering_ids(token, after)
                expect(seen == after, f"after the update: {sorted(seen)} vs {sorted(after)}")
                time.sleep(3)
            return action
        timed("service update --force (start-first)", update("--force"))
        sh("docker", "tag", env["GATEHOUSE_IMAGE"], NEXT_TAG)
        timed("service update --image (start-first)", update("--image", NEXT_TAG))

        def kill_backend():
            before = healthy_backend_ids()
            victim = containers(BACKEND)[0]
            sh("docker", "kill", victim)
            def replaced():
                ids = healthy_backend_ids()
                return len(ids) == args.replicas and victim[:12] not in ids
            wait_for("a replacement backend", replaced, timeout=120)
            after = healthy_backend_ids()
            seen, _ = answering_ids(token, after)
            expect(seen == after, f"after the kill: {sorted(seen)} vs {sorted(after)}")
            return f"killed {victim[:12]}, replaced by {sorted(after - before)}"
        c = timed("docker kill a backend", kill_backend)
        expect(c["failed"] <= CLIENTS, f"a backend kill failed {c['failed']} requests, more than were in flight")

        def restart_redis():
            _, _, before = count(token)
            victim = containers(REDIS)[0]
            sh("docker", "stop", "-t", "10", victim)
            status, headers, _ = wait_for("503 while Redis is down", lambda: (r := count(token))[0] == 503 and r,
                                          timeout=30, every=CHECK_PAUSE_S)
            expect(headers.get("retry-after") is not None, "503 without Retry-After")
            t_down = time.monotonic()
            after = wait_for("the count again", lambda: (r := count(token))[0] == 200 and r[2], timeout=120,
                             every=CHECK_PAUSE_S)
            expect(after == before + 1, f"count before {before}, after Redis's restart {after}")
            return f"503 for {time.monotonic() - t_down:.1f} s, count {before} -> {after}"
        timed("Redis stopped, Swarm restarts it", restart_redis)

        def kill_edge():
            victim = containers(EDGE)[0]
            t_kill = time.monotonic()
            sh("docker", "kill", victim)
            wait_for("the edge again", lambda: request("GET", "/api/ping")[0] == 200, timeout=120, every=0.2)
            return f"outage {time.monotonic() - t_kill:.1f} s until a new edge served"
        timed("docker kill the edge", kill_edge)

        load.begin("end")
        load.finish()

        def remove():
            sh("docker", "stack", "rm", STACK)
            wait_for("the stack to go", lambda: not stack_leftovers(), timeout=120)
        timed("docker stack rm", remove)

        if shutil.which("docker-compose"):
            def compose_v1():
                try:
                    sh(*COMPOSE_V1, "config", "-q")
                    sh(*COMPOSE_V1, "up", "-d", timeout=300)
                    wait_for("the edge under docker-compose", lambda: request("GET", "/api/ping")[0] == 200,
                             timeout=120)
                    wait_for("a login", login, timeout=60, every=1.5)
                    return walkthrough() + f"; {len(containers_v1('backend'))} backends"
                finally:
                    sh(*COMPOSE_V1, "down", "-v", "--remove-orphans", check=False, timeout=300)
            timed("docker-compose (v1) up -d, the walkthrough, down -v", compose_v1)
        else:
            rows.append(("docker-compose (v1): skipped, not installed", 0, 0, 0.0, ""))
    except Exception as error:  # noqa: BLE001 - reported, then cleaned up
        failures.append(f"{type(error).__name__}: {error}")
        log("ERROR:", error)
    finally:
        load.finish()
        if stack_leftovers():
            sh("docker", "stack", "rm", STACK, check=False)
            try:
                wait_for("the stack to go", lambda: not stack_leftovers(), timeout=120)
            except RuntimeError as error:
                failures.append(str(error))
        left = stack_leftovers()
        if left:
            failures.append(f"docker stack rm left {left}")
        # The stack's volumes outlive `docker stack rm` by design (Redis's data); a test's
        # are removed so the next run starts afresh.
        for volume in sh("docker", "volume", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={STACK}",
                         check=False).split():
            sh("docker", "volume", "rm", volume, check=False)
        if shutil.which("docker-compose") and containers_v1("edge") + containers_v1("backend") + containers_v1("redis"):
            sh(*COMPOSE_V1, "down", "-v", "--remove-orphans", check=False, timeout=300)
        sh("docker", "image", "rm", NEXT_TAG, check=False)
        client_namespace(False)
        if started_swarm:
            sh("docker", "swarm", "leave", "--force", check=False)
            if not gwbridge_was:
                sh("docker", "network", "rm", "docker_gwbridge", check=False)
            SWARM_MARKER.unlink(missing_ok=True)

    bad_steps = [(s, sent, failed) for s, sent, failed, _, _ in rows
                 if failed and not (s.startswith("docker kill") or s.startswith("Redis"))]
    for step, sent, failed in bad_steps:
        failures.append(f"{step}: {failed} of {sent} requests failed")
    print()
    print(f"| step | requests sent | failed | seconds | notes |")
    print(f"|---|---:|---:|---:|---|")
    for step, sent, failed, seconds, note in rows:
        print(f"| {step} | {sent} | {failed} | {seconds:.1f} | {note} |")
    causes = {s: c["causes"] for s, c in load.counts.items() if c["causes"]}
    resent = sum(c["resent"] for c in load.counts.values())
    print(f"\nfailures by cause: {json.dumps(causes)}; resent once on a closed keep-alive connection: {resent}")
    if failures:
        print("\nswarm test FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nswarm test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
