#!/usr/bin/env bash
# Builds every image the stack uses without a container registry: only Debian's packages
# (mmdebstrap, then `docker import`) and crates (cargo, on this machine).
#
#   scripts/image.sh                 # gatehouse:latest, and the Redis image if it is missing
#   scripts/image.sh --monitoring    # and the Prometheus image
#   scripts/image.sh --systemd       # and the systemd image (scripts/systemd-test.sh)
#   scripts/image.sh --fresh         # make the Debian images again even if they exist
#   scripts/image.sh --max-age DAYS  # make again the Debian images older than this; default 7
#   scripts/image.sh --no-build      # take target/release/gatehouse as it is
#
# What it makes (RELEASE: this machine's Debian release, e.g. bookworm; DEBIAN_RELEASE=...
# to choose another, whose glibc must be at least this machine's):
#
#   gatehouse-base:RELEASE        Debian's minimal system (minbase), without the
#                                 documentation, manual pages and translations, like
#                                 debian:RELEASE-slim
#   gatehouse:latest              the Dockerfile's runtime stage on that base, with the release
#                                 binary cargo built here (GATEHOUSE_IMAGE=... to name it)
#   gatehouse-redis:RELEASE       Debian's redis-server, as the stack's Redis
#   gatehouse-prometheus:RELEASE  Debian's prometheus (--monitoring)
#   gatehouse-redis-exporter:RELEASE  Debian's prometheus-redis-exporter (--monitoring)
#   gatehouse-systemd:RELEASE     systemd as the first process, with redis-server and
#                                 logrotate: a machine to run conf/systemd/gatehouse.service in
#                                 (--systemd; scripts/systemd-test.sh)
#
# and writes target/images.env, the compose variables that name them, for `docker stack
# deploy` (which reads no .env file):
#
#   set -a; . target/images.env; set +a
#   docker stack deploy -c compose.yaml gatehouse
#
# A Debian image is kept from one run to the next (each takes a minute or more to make), and
# made again once it is older than --max-age days (GATEHOUSE_BASE_MAX_AGE_DAYS; default 7),
# so the images take Debian's security updates within a week; its age is printed either way.
#
# The Dockerfile stays the definition: its runtime stage is built from the file itself, with
# the classic builder (BuildKit's buildx is not installed here, and the build stage's cache
# mounts need it), through two of its build arguments, RUNTIME_BASE and BINARY_FROM.
set -euo pipefail
cd "$(dirname "$0")/.."

monitoring=0 systemd=0 fresh=0 build=1 max_age=${GATEHOUSE_BASE_MAX_AGE_DAYS:-7}
usage() {
    echo "usage: $0 [--monitoring] [--systemd] [--fresh] [--max-age DAYS] [--no-build]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
    --monitoring) monitoring=1 ;;
    --systemd) systemd=1 ;;
    --fresh) fresh=1 ;;
    --no-build) build=0 ;;
    --max-age)
        [ $# -ge 2 ] || usage
        max_age=$2
        shift
        ;;
    *) usage ;;
    esac
    shift
done
case "$max_age" in '' | *[!0-9]*)
    echo "--max-age (GATEHOUSE_BASE_MAX_AGE_DAYS) takes a whole number of days, not '$max_age'" >&2
    exit 2
    ;;
esac

for tool in docker mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "$tool is missing (apt-get install ${tool/docker/docker.io})" >&2
        exit 1
    }
done

release=${DEBIAN_RELEASE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}
[ -n "$release" ] || {
    echo "cannot tell this machine's Debian release: set DEBIAN_RELEASE" >&2
    exit 1
}
base=gatehouse-base:$release
image=${GATEHOUSE_IMAGE:-gatehouse:latest}
redis=gatehouse-redis:$release
prometheus=gatehouse-prometheus:$release
redis_exporter=gatehouse-redis-exporter:$release
systemd_image=gatehouse-systemd:$release
# Per run, so that two runs at once do not take each other's binary.
binary=gatehouse-binary:$$

started=$SECONDS
step() {
    printf '%4ds  %s\n' "$((SECONDS - started))" "$*"
}

# A Debian system as an image: mmdebstrap writes the tarball, docker imports it.
# $1 image, $2 packages to add (comma-separated, may be empty), then `docker import` options.
debian_image() {
    local name=$1 include=$2
    shift 2
    local created age_days
    if [ "$fresh" = 0 ] && created=$(docker image inspect -f '{{.Created}}' "$name" 2>/dev/null); then
        age_days=$((($(date +%s) - $(date -d "$created" +%s)) / 86400))
        if [ "$age_days" -lt "$max_age" ]; then
            step "$name: kept, made $age_days days ago (--fresh to make it again)"
            return
        fi
        step "$name: made $age_days days ago, --max-age is $max_age: made again"
    fi
    step "$name: mmdebstrap $release${include:+ with $include}"
    # The documentation, manual pages and translations are left out as in Debian's slim
    # images; the dpkg settings stay in the image, so packages added later leave them out too.
    mmdebstrap --quiet --variant=minbase ${include:+--include="$include"} \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/groff/*' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        "${HOOKS[@]}" \
        "$release" - | docker import "$@" - "$name" >/dev/null
}

HOOKS=()
debian_image "$base" "" --change 'CMD ["bash"]'

# Redis as the official image runs it: user redis, its data in /data (owned by redis, so a
# new volume there is too).
HOOKS=(--customize-hook='mkdir -p "$1/data" && chroot "$1" chown redis:redis /data')
debian_image "$redis" redis-server \
    --change 'USER redis' --change 'WORKDIR /data' --change 'VOLUME /data' \
    --change 'EXPOSE 6379' --change 'CMD ["redis-server"]'

if [ "$monitoring" = 1 ]; then
    HOOKS=(--customize-hook='mkdir -p "$1/prometheus" && chroot "$1" chown prometheus:prometheus /prometheus')
    debian_image "$prometheus" prometheus \
        --change 'USER prometheus' --change 'WORKDIR /prometheus' --change 'VOLUME /prometheus' \
        --change 'EXPOSE 9090' --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
        --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
    HOOKS=()
    debian_image "$redis_exporter" prometheus-redis-exporter \
        --change 'USER nobody' --change 'EXPOSE 9121' \
        --change 'ENTRYPOINT ["/usr/bin/prometheus-redis-exporter"]'
fi

if [ "$systemd" = 1 ]; then
    HOOKS=()
    debian_image "$systemd_image" systemd,systemd-sysv,dbus,redis-server,logrotate,procps \
        --change 'CMD ["/sbin/init"]'
fi

if [ "$build" = 1 ]; then
    step "cargo build --release"
    nice -n 10 cargo build --release --locked --bin gatehouse
fi
[ -x target/release/gatehouse ] || {
    echo "target/release/gatehouse is missing: run without --no-build" >&2
    exit 1
}

step "$binary: the release binary"
mkdir -p target
staging=$(mktemp -d target/image-build.XXXXXX)
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging/usr/local/bin"
cp target/release/gatehouse "$staging/usr/local/bin/gatehouse"
tar -C "$staging" -c usr | docker import - "$binary" >/dev/null

step "$image: the Dockerfile's runtime stage"
# The global build arguments (everything before the first FROM), then the file from the
# binary stage on: the same lines `docker build .` runs, without the build stage.
awk '
    /^FROM / && !started { preamble_done = 1 }
    /^FROM \$\{BINARY_FROM\} AS binary/ { started = 1 }
    !preamble_done || started { print }
' Dockerfile >"$staging/Dockerfile.runtime"
grep -q '^FROM \${RUNTIME_BASE} AS runtime' "$staging/Dockerfile.runtime" || {
    echo "the Dockerfile has no runtime stage after its binary stage" >&2
    exit 1
}
DOCKER_BUILDKIT=0 docker build --quiet -f "$staging/Dockerfile.runtime" \
    --build-arg DEBIAN_RELEASE="$release" --build-arg RUNTIME_BASE="$base" \
    --build-arg BINARY_FROM="$binary" -t "$image" . >/dev/null 2>"$staging/build.log" || {
    cat "$staging/build.log" >&2
    exit 1
}
docker image rm "$binary" >/dev/null

{
    echo "GATEHOUSE_IMAGE=$image"
    echo "REDIS_IMAGE=$redis"
    if [ "$monitoring" = 1 ]; then
        echo "PROMETHEUS_IMAGE=$prometheus"
        echo "REDIS_EXPORTER_IMAGE=$redis_exporter"
    fi
} >target/images.env

step "done; sizes:"
for name in "$base" "$image" "$redis" $([ "$monitoring" = 1 ] && echo "$prometheus $redis_exporter") \
    $([ "$systemd" = 1 ] && echo "$systemd_image"); do
    printf '      %-32s %s\n' "$name" "$(docker image inspect -f '{{.Size}}' "$name" | numfmt --to=iec)"
done
echo "compose variables in target/images.env:"
sed 's/^/      /' target/images.env
