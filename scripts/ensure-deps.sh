#!/usr/bin/env bash
# Makes sure the system packages gatehouse needs are present: cmake (to build Pingora's
# zlib-ng), redis-server (the managed Redis, and the tests' Redis), and with --tests what the
# tests use besides (openssl, apache2-utils). Installs them with
# apt-get when it can; otherwise prints the exact command and fails.
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${1:-}" = "--tests" ]; then
    # The TLS tests talk to the server with `openssl s_client`; the access tests make
    # htpasswd files with the real `htpasswd` tool.
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
fi
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
[ ${#missing[@]} -eq 0 ] && exit 0

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
