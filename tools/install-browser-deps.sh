#!/usr/bin/env bash
# Dependencies of tests/test_browser.py outside PyPI: Debian's Chromium and its chromedriver (apt). The
# Selenium bindings are pinned in requirements-dev.txt and given /usr/bin/chromedriver and /usr/bin/chromium
# explicitly, so nothing downloads a browser or driver of its own. Needs root (or sudo) for apt-get.
set -euo pipefail

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
fi
/usr/bin/chromium --version
/usr/bin/chromedriver --version
