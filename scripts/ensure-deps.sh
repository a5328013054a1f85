#!/usr/bin/env bash
# Makes sure the system packages gatehouse needs are present: cmake (to build Pingora's
# zlib-ng), redis-server (the managed Redis, and the tests' Redis), and with --tests what the
# tests use besides (openssl, apache2-utils, pebble, and schemathesis from PyPI). Installs them with
# apt-get (and pip) when it can; otherwise prints the exact command and fails.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
# schemathesis checks the running API against its OpenAPI document (tests/accounts.rs looks
# for it here). A virtualenv of its own: Debian's Python refuses system-wide pip installs.
schemathesis_venv="$repo/target/tools/schemathesis"
schemathesis_version='schemathesis>=4,<5'

missing=()
need_schemathesis=false
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${1:-}" = "--tests" ]; then
    # The TLS tests talk to the server with `openssl s_client`; the access tests make
    # htpasswd files with the real `htpasswd` tool.
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
    # The ACME tests get their certificates from pebble, the ACME test server, with its DNS
    # server pebble-challtestsrv (one package).
    command -v pebble >/dev/null 2>&1 || missing+=(pebble)
    if [ ! -x "$schemathesis_venv/bin/schemathesis" ] && ! command -v schemathesis >/dev/null 2>&1; then
        need_schemathesis=true
        command -v python3 >/dev/null 2>&1 || missing+=(python3)
        python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    fi
fi
command -v cc >/dev/null 2>&1 || missing+=(build-essential)

if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "gatehouse needs: ${missing[*]}. Install them with your package manager." >&2
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "gatehouse needs: ${missing[*]}. Run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
            exit 1
        fi
    fi
    echo "installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if $need_schemathesis; then
    echo "installing $schemathesis_version from PyPI into $schemathesis_venv" >&2
    python3 -m venv "$schemathesis_venv"
    "$schemathesis_venv/bin/pip" install --quiet --disable-pip-version-check "$schemathesis_version"
fi
