#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, run and test Parley.
# Idempotent and quiet: does nothing when everything is already there.
set -euo pipefail

# nodejs, curl, openssl: the HTTP/2, TLS and RFC 8441 end-to-end tests (tests/tests/http2.rs)
# chromium + chromium-driver: the browser test of the demo page (tests/python/test_demo_page.py).
# fonts-dejavu-core: labels on the load generator's PNG plots (bench/load).
# sip-tester (SIPp) + tcpdump + baresip: the SIP bridge end-to-end tests (tests/tests/sip.rs; tcpdump needs root;
# baresip is the second real client, headless: aufile plays the question, sndfile records the reply).
APT_PACKAGES=(cmake g++ make clang libclang-dev pkg-config libopus-dev espeak-ng libespeak-ng-dev sox nodejs curl openssl chromium chromium-driver fonts-dejavu-core sip-tester tcpdump baresip)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The model installer fetches wheels with pip.
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
