#!/bin/sh
set -eu
if [ "${1:-}" = redis-server ]; then
    shift
    # Debian's build keeps protected mode on; the official image's is off by default.
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
