#!/usr/bin/env bash
# Install a headless-capable Chromium for the browser tests (tests/server/test_browser.py).
# Idempotent: does nothing when /usr/bin/chromium already exists. Debian/Ubuntu (apt) only.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-noto-cjk
/usr/bin/chromium --version || true
