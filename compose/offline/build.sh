#!/usr/bin/env bash
# Build the images compose/docker-compose.yml needs from Debian's packages alone, for
# Docker hosts that cannot pull from Docker Hub:
#
#   inferq-offline/python:3.11      BASE_IMAGE of compose/Dockerfile (Debian's Python 3.11)
#   inferq-offline/postgres:15      stands in for postgres:16-alpine (same environment)
#   inferq-offline/redis:7          stands in for redis:7-alpine
#   inferq-offline/prometheus:2     stands in for prom/prometheus
#
# Needs root (mmdebstrap), a Docker engine, and Debian's archive and PyPI reachable.
# Usage: bash compose/offline/build.sh            (skips images that already exist)
#        INFERQ_OFFLINE_REBUILD=1 bash compose/offline/build.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
suite=${INFERQ_OFFLINE_SUITE:-bookworm}
mirror=${INFERQ_OFFLINE_MIRROR:-http://deb.debian.org/debian}
root_tag=inferq-offline/debian:$suite

have() { [ -z "${INFERQ_OFFLINE_REBUILD:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }
say() { printf '[offline] %s\n' "$*" >&2; }

if ! have "$root_tag"; then
    command -v mmdebstrap >/dev/null || { say "mmdebstrap is missing: apt-get install -y mmdebstrap"; exit 1; }
    say "root file system: mmdebstrap $suite from $mirror"
    tarball=$(mktemp --suffix=.tar)
    trap 'rm -f "$tarball"' EXIT
    mmdebstrap --variant=apt --include=ca-certificates,passwd "$suite" "$tarball" "$mirror"
    docker import --change 'CMD ["/bin/bash"]' "$tarball" "$root_tag" >/dev/null
    rm -f "$tarball"
fi

build() {  # tag, build context
    have "$1" && { say "$1: present"; return; }
    say "$1: building"
    docker build --network host --build-arg "ROOT=$root_tag" -t "$1" "$2"
}

# pip inside builds on this host verifies the registry with the host's CA bundle (the
# file PIP_CERT names, if any): it goes into the python image, from a build context of
# its own so that it never lands in the checkout.
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$here/python/Dockerfile" "$context/"
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    cp "$PIP_CERT" "$context/host-ca.crt"
else
    : >"$context/host-ca.crt"
fi
build inferq-offline/python:3.11 "$context"
build inferq-offline/postgres:15 "$here/postgres"
build inferq-offline/redis:7 "$here/redis"
build inferq-offline/prometheus:2 "$here/prometheus"
say "done"
