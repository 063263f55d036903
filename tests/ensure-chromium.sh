#!/bin/sh
# Make sure Debian's headless Chromium and its WebDriver are installed (as root, or with
# passwordless sudo), for tests/test_dashboard.py. The package index is refreshed only when
# the plain install fails, which keeps a warm machine fast.
set -u
have() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
have && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: chromium/chromedriver are missing and there is no apt-get here" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure-chromium: installing chromium needs root (apt-get install -y chromium chromium-driver)" >&2
        exit 1
    fi
fi

echo "ensure-chromium: installing chromium and chromium-driver with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }

have && exit 0
echo "ensure-chromium: could not install chromium chromium-driver (apt-get install failed, also after apt-get update)" >&2
exit 1
