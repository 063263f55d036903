#!/bin/sh
# Make sure the wrk load generator is installed (Debian/Ubuntu, as root).
# The index is refreshed only when the plain install fails, which keeps a warm machine fast.
set -u
command -v wrk >/dev/null 2>&1 && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-wrk: wrk is missing and there is no apt-get here; install wrk by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "ensure-wrk: wrk is missing and installing it needs root (apt-get install -y wrk)" >&2
        exit 1
    fi
fi

echo "ensure-wrk: installing wrk with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q wrk >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q wrk >/dev/null 2>&1; }

if command -v wrk >/dev/null 2>&1; then
    exit 0
fi
echo "ensure-wrk: could not install wrk (apt-get install -y wrk failed, also after apt-get update)" >&2
exit 1
