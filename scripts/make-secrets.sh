#!/usr/bin/env bash
# Makes the secret files that compose.yaml and compose.monitoring.yaml mount, in secrets/
# (ignored by git and by docker build):
#
#   secrets/jwt_secret              random; signs the backends' JWTs, one for every replica
#   secrets/admin_password          random; the password of gatehouse's first user, `admin`
#   secrets/htpasswd                basic-auth users of /close/: a copy of conf/htpasswd, whose
#                                   development user (admin / homework) you replace
#   secrets/redis_password          random; Redis's requirepass, and the backends' password
#   secrets/redis_exporter_passwords.json  the same password for the Redis exporter, in its
#                                   format ({"redis://redis:6379": "..."})
#   secrets/grafana_admin_password  random; the password of Grafana's `admin` user
#
# A file that exists is kept, so running this again changes nothing: delete a file to have it
# made anew. Needs only coreutils.
set -euo pipefail
cd "$(dirname "$0")/.."

# The directory keeps other users of this machine out. The files inside must stay readable by
# the containers' users (gatehouse runs as uid 10001, Grafana as uid 472), because
# `docker compose` bind-mounts a secret file as it is, owner and mode included.
# (`docker stack deploy` copies the contents into Swarm instead.)
mkdir -p secrets
chmod 700 secrets

# $1 random bytes as base64, without a newline.
random() {
    head -c "$1" /dev/urandom | base64 | tr -d '\n'
}

if [ ! -e secrets/jwt_secret ]; then
    # 48 bytes: 64 characters, over the 32 bytes gatehouse requires.
    random 48 >secrets/jwt_secret
    echo "made secrets/jwt_secret (random)"
fi
if [ ! -e secrets/admin_password ]; then
    # 18 bytes: 24 characters. Printed once, here; read it again from the file.
    random 18 >secrets/admin_password
    echo "made secrets/admin_password (random): log in to the API as admin with it"
fi
if [ ! -e secrets/htpasswd ]; then
    cp conf/htpasswd secrets/htpasswd
    echo "made secrets/htpasswd: the development user admin / homework."
    echo "  Replace it before going live: htpasswd -B -c secrets/htpasswd NAME   (apache2-utils)"
fi
if [ ! -e secrets/redis_password ]; then
    # base64 of 24 bytes: 32 characters, no quote, nothing JSON or a shell must escape.
    random 24 >secrets/redis_password
    echo "made secrets/redis_password (random)"
fi
if [ ! -e secrets/redis_exporter_passwords.json ] ||
    [ secrets/redis_password -nt secrets/redis_exporter_passwords.json ]; then
    printf '{"redis://redis:6379": "%s"}\n' "$(cat secrets/redis_password)" \
        >secrets/redis_exporter_passwords.json
    echo "made secrets/redis_exporter_passwords.json (from secrets/redis_password)"
fi
if [ ! -e secrets/grafana_admin_password ]; then
    random 18 >secrets/grafana_admin_password
    echo "made secrets/grafana_admin_password (random; Grafana's user is admin)"
fi
chmod 644 secrets/jwt_secret secrets/admin_password secrets/htpasswd \
    secrets/redis_password secrets/redis_exporter_passwords.json secrets/grafana_admin_password
