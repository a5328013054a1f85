#!/usr/bin/env bash
# conf/systemd/gatehouse.service for real: systemd as the first process of a container made
# from Debian's packages (scripts/image.sh --systemd), the unit installed as the docs say,
# then start (ready only once the group serves), reload, upgrade, a crash, stop, logrotate.
#
#   scripts/systemd-test.sh            # skips without a Docker daemon (fails under CI=...)
#   scripts/systemd-test.sh --no-build # take target/release/gatehouse as it is
#
# The container has nearly every capability: systemd, as its first process, mounts the
# cgroup hierarchy and builds each unit's sandbox (the unit's ProtectSystem=, PrivateTmp=,
# ProtectProc= and the rest are mount namespaces, which take CAP_SYS_ADMIN; User= takes
# CAP_SETUID and CAP_SETGID; AmbientCapabilities= is granted from the container's bounding
# set, so CAP_NET_BIND_SERVICE must be in it). gatehouse itself gets only what the unit
# gives it, which the test checks. The container talks to nothing but itself, and is
# removed at the end, passed or failed.
set -euo pipefail
cd "$(dirname "$0")/.."

build=(); [ "${1:-}" = --no-build ] && build=(--no-build)
if ! docker info >/dev/null 2>&1; then
    if [ -n "${CI:-}" ]; then
        echo "systemd test: no Docker daemon answers, and CI requires this test" >&2
        exit 1
    fi
    echo "systemd test: skipped, no Docker daemon answers"
    exit 0
fi

scripts/image.sh --systemd "${build[@]}"
release=$(. /etc/os-release && echo "$VERSION_CODENAME")
release=${DEBIAN_RELEASE:-$release}
name=gatehouse-systemd-test
started=$SECONDS
failed=0
step() { printf '%4ds  %s\n' "$((SECONDS - started))" "$*"; }
check() {
    local what=$1
    shift
    if "$@"; then
        step "ok: $what"
    else
        step "FAILED: $what"
        failed=1
    fi
}
in_box() { docker exec "$name" "$@"; }
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

# systemd needs most capabilities (to mount the unit's sandbox) and the cgroup hierarchy.
# Every capability but CAP_SYS_RESOURCE rather than --privileged: some hosts withhold that
# one from Docker, and a --privileged container then cannot start.
docker run -d --name "$name" --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --stop-signal SIGRTMIN+3 --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
    -v /sys/fs/cgroup:/sys/fs/cgroup:rw --cgroupns=host \
    "gatehouse-systemd:$release" >/dev/null
for _ in $(seq 100); do
    state=$(in_box systemctl is-system-running 2>/dev/null || true)
    case "$state" in running | degraded) break ;; esac
    sleep 0.2
done
step "systemd is up in $name ($state)"

# The installation, as docs/operations.md#under-systemd gives it.
docker cp target/release/gatehouse "$name:/usr/local/bin/gatehouse"
docker cp conf/systemd/gatehouse.service "$name:/etc/systemd/system/gatehouse.service"
docker cp conf/systemd/logrotate "$name:/etc/logrotate.d/gatehouse"
in_box mkdir -p /etc/gatehouse/secrets /opt/gatehouse
docker cp static "$name:/opt/gatehouse/static"
docker cp conf/systemd/gatehouse.toml "$name:/etc/gatehouse/gatehouse.toml"
docker cp conf/htpasswd "$name:/etc/gatehouse/htpasswd"
docker cp conf/container/users "$name:/etc/gatehouse/users"
in_box sh -c '
    set -e
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gatehouse
    head -c 48 /dev/urandom | base64 -w0 >/etc/gatehouse/secrets/jwt_secret
    head -c 18 /dev/urandom | base64 -w0 >/etc/gatehouse/secrets/admin_password
    chown -R root:gatehouse /etc/gatehouse
    chmod 750 /etc/gatehouse/secrets
    chmod 640 /etc/gatehouse/secrets/*
    systemctl daemon-reload'

check "systemd-analyze verify" in_box systemd-analyze verify /etc/systemd/system/gatehouse.service

# Type=notify: `systemctl start` returns once the supervisor reported READY=1.
t0=$SECONDS
check "systemctl start (returns when ready)" in_box systemctl start gatehouse
step "started in $((SECONDS - t0)) s"
check "active" in_box systemctl is-active --quiet gatehouse
check "ready at once: /readyz (every backend and Redis)" \
    in_box gatehouse healthcheck --ready --config /etc/gatehouse/gatehouse.toml
ping() {
    in_box bash -c 'exec 3<>/dev/tcp/127.0.0.1/80 && printf "GET /api/ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3 && cat <&3' |
        head -1 | grep -q "301"
}
check "port 80 bound by the gatehouse user (its redirect answers)" ping
proxy_pid() { in_box sh -c 'pgrep -u gatehouse -f "gatehouse proxy" | head -1'; }
check "runs as gatehouse, not root" \
    in_box sh -c '[ "$(ps -o user= -p "$(systemctl show -p MainPID --value gatehouse)")" = gatehouse ]'
main_pid=$(in_box systemctl show -p MainPID --value gatehouse)

# The unit's ambient CAP_NET_BIND_SERVICE (bit 10, 0x400) is for binding ports 80 and 443:
# the supervisor keeps it for the proxy alone; backends and Redis run with no capability.
caps_of() { # pid field -> its hexadecimal value in /proc/PID/status
    in_box awk -v field="$2:" '$1 == field { print $2 }' "/proc/$1/status"
}
has_caps() { # pid CapAmb CapEff
    local amb eff
    amb=$(caps_of "$1" CapAmb) eff=$(caps_of "$1" CapEff)
    step "  pid $1: CapAmb $amb CapEff $eff"
    [ "$amb" = "$2" ] && [ "$eff" = "$3" ]
}
backend_pid=$(in_box pgrep -u gatehouse -f "gatehouse backend" | head -1)
redis_pid=$(in_box pgrep -u gatehouse -x redis-server | head -1)
check "the supervisor keeps CAP_NET_BIND_SERVICE" has_caps "$main_pid" 0000000000000400 0000000000000400
check "the proxy keeps CAP_NET_BIND_SERVICE" has_caps "$(proxy_pid)" 0000000000000400 0000000000000400
check "a backend has no capability" has_caps "$backend_pid" 0000000000000000 0000000000000000
check "the managed Redis has no capability" has_caps "$redis_pid" 0000000000000000 0000000000000000

check "systemctl reload" in_box systemctl reload gatehouse
sleep 1
check "reload applied (journal)" in_box sh -c 'journalctl -u gatehouse --no-pager | grep -q "reloading: the proxy re-reads the configuration"'
check "a bad config: reload fails, the group serves on" in_box sh -c '
    cp /etc/gatehouse/gatehouse.toml /tmp/good.toml
    echo "nonsense = [" >>/etc/gatehouse/gatehouse.toml
    if systemctl reload gatehouse 2>/dev/null; then exit 1; fi
    cp /tmp/good.toml /etc/gatehouse/gatehouse.toml
    systemctl is-active --quiet gatehouse'

old_proxy=$(proxy_pid)
in_box cp /usr/local/bin/gatehouse /usr/local/bin/gatehouse.new
in_box mv /usr/local/bin/gatehouse.new /usr/local/bin/gatehouse
check "upgrade (gatehouse upgrade)" in_box gatehouse upgrade --config /etc/gatehouse/gatehouse.toml
upgraded() {
    for _ in $(seq 100); do
        now=$(proxy_pid || true)
        if [ -n "$now" ] && [ "$now" != "$old_proxy" ]; then return 0; fi
        sleep 0.2
    done
    return 1
}
check "a new proxy took over, the supervisor stayed" upgraded
check "same main pid after reload and upgrade" \
    test "$(in_box systemctl show -p MainPID --value gatehouse)" = "$main_pid"

in_box bash -c 'for i in 1 2 3; do exec 3<>/dev/tcp/127.0.0.1/80; printf "GET /open/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3; cat <&3 >/dev/null; done'
# On the upgraded proxy. Lines logged before the proxy reopens (at its writer's next turn)
# still go to the rotated file: the request is sent once the new file exists.
check "logrotate: the access log rotated and reopened" in_box bash -c '
    logrotate -f /etc/logrotate.d/gatehouse || exit 1
    [ -e /var/log/gatehouse/access.log.1 ] || exit 1
    for _ in $(seq 50); do [ -e /var/log/gatehouse/access.log ] && break; sleep 0.2; done
    exec 3<>/dev/tcp/127.0.0.1/80
    printf "GET /open/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3
    cat <&3 >/dev/null
    # The access log is written in batches: the line arrives within a few seconds.
    for _ in $(seq 50); do [ -s /var/log/gatehouse/access.log ] && exit 0; sleep 0.2; done
    exit 1'

# A crash of the supervisor: the children go with it (SIGTERM on their parent's death) and
# systemd starts the group again (Restart=on-failure).
in_box kill -9 "$main_pid"
restarted() {
    for _ in $(seq 150); do
        pid=$(in_box systemctl show -p MainPID --value gatehouse)
        if [ "$pid" != 0 ] && [ "$pid" != "$main_pid" ] &&
            in_box systemctl is-active --quiet gatehouse; then return 0; fi
        sleep 0.2
    done
    return 1
}
t0=$SECONDS
check "restarted after kill -9 of the supervisor" restarted
step "active again $((SECONDS - t0)) s after the crash"
check "ready again" in_box gatehouse healthcheck --ready --config /etc/gatehouse/gatehouse.toml

t0=$SECONDS
check "systemctl stop" in_box systemctl stop gatehouse
step "stopped in $((SECONDS - t0)) s"
check "no process of the group left" in_box sh -c '! pgrep -u gatehouse >/dev/null'
check "stopped cleanly (exit status 0)" \
    test "$(in_box systemctl show -p ExecMainStatus --value gatehouse)" = 0
check "the runtime directory is gone" in_box test ! -e /run/gatehouse

if [ "$failed" != 0 ]; then
    echo "--- journal"
    in_box journalctl -u gatehouse --no-pager | tail -60
    echo "systemd test FAILED"
    exit 1
fi
echo "systemd test passed"
