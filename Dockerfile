# syntax=docker/dockerfile:1
#
# gatehouse in a container: the same process group as `gatehouse run` anywhere else (the proxy
# and its backends on Unix sockets inside the container), with Redis as a separate service.
#
#   docker build -t gatehouse .
#
# Without a registry, scripts/image.sh builds the same image: the runtime stage below, from
# this file, on a base made from Debian's packages, with a binary built by cargo outside
# Docker (the two build arguments below).
#
# The image is meant to run under compose.yaml, which gives it its secrets, Redis, a volume for
# certificates and a tmpfs for sockets (docs/docker.md). It needs no network at run
# time beyond Redis, and writes only to the two volumes declared below.

# Builder and runtime must be the same Debian release: the binary links against its glibc.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie
# The runtime stage's base image (scripts/image.sh: one it made with mmdebstrap).
ARG RUNTIME_BASE=debian:${DEBIAN_RELEASE}-slim
# What the binary is copied from: the build stage, or an image holding
# /usr/local/bin/gatehouse (scripts/image.sh: the release binary cargo built on the host).
ARG BINARY_FROM=build

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# cmake: Pingora compresses with zlib-ng, whose build runs cmake.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The crate registry and target/ are cache mounts that outlive this build, so the next build
# downloads nothing and recompiles only what changed (usually gatehouse's own crates, not
# Pingora). A cache mount is not part of the image, so the binary is copied out in this step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin gatehouse \
    && cp target/release/gatehouse /usr/local/bin/gatehouse

# A stage of its own because `COPY --from` takes no variable. scripts/image.sh builds the
# lines from here on, with the classic builder (which cannot run the build stage's cache
# mounts) when BuildKit is not installed.
FROM ${BINARY_FROM} AS binary

FROM ${RUNTIME_BASE} AS runtime
# An unprivileged user with fixed ids, so volumes and secrets can be given to it by number.
# No setuid or setgid file is left in the image: no program in it can raise a process's
# privileges, also where no-new-privileges cannot be set (`docker stack deploy` ignores
# compose's security_opt).
RUN groupadd --gid 10001 gatehouse \
    && useradd --uid 10001 --gid gatehouse --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin gatehouse \
    && find / -xdev -type f -perm /6000 -exec chmod ug-s {} +
WORKDIR /app
COPY --from=binary /usr/local/bin/gatehouse /usr/local/bin/gatehouse
# Owned by root and read-only to gatehouse: it cannot change its own sites or config.
# conf/users (the development admin / password) is left out by .dockerignore: the image's
# users file is conf/container/users, with no user, and the first admin's password comes from
# the `admin_password` secret.
COPY static/ /app/static/
COPY conf/ /app/conf/
# What gatehouse writes, each a volume owned by its user:
#   /app/certs    the self-signed pair `gatehouse run` makes when no certificate is there
#   /app/var/run  backend and admin sockets, lock and metrics files (compose mounts a tmpfs)
#   /app/var/backends  the stack's socket directory (GATEHOUSE_SOCKET_DIR): a volume the edge
#                 shares with the backends of its node; a new volume takes this owner
# /app/secrets is where compose mounts the secrets that conf/container/gatehouse.toml names.
RUN mkdir -p /app/certs /app/var/run /app/var/backends /app/secrets \
    && chown gatehouse:gatehouse /app/certs /app/var/run /app/var/backends
VOLUME ["/app/certs", "/app/var/run"]
# Every subcommand (run, check, healthcheck) reads the config named here. Application logs go
# out as JSON lines, one event per line for a log collector, like the access logs that config
# sends to stdout.
ENV GATEHOUSE_CONFIG=/app/conf/container/gatehouse.toml \
    GATEHOUSE_LOG_FORMAT=json
USER gatehouse:gatehouse
# HTTP (redirects to HTTPS) and HTTPS. The admin listener (9180: /metrics, /healthz, /readyz)
# is for the container network only and is deliberately not exposed.
EXPOSE 8080 8443
# Liveness, not readiness: /readyz also fails while Redis is down, and restarting every
# replica then would not bring Redis back (the backends answer 503 until it returns).
# `gatehouse healthcheck` asks the admin listener, so the image needs no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["gatehouse", "healthcheck"]
# SIGTERM (the default, said here because the group depends on it): the proxy drains, then
# the backends; allow it proxy.shutdown_grace and more (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["gatehouse"]
CMD ["run"]
