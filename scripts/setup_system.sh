#!/usr/bin/env bash
# System packages the tests use: Prometheus 2.42 + promtool from the Debian `prometheus` package
# (tests/integration/test_observability.py checks deploy/ with promtool and scrapes a real job).
# Best effort: never fails. Without root (or non-interactive sudo) or apt-get it says so and returns;
# the observability tests then skip with that reason. Cheap when promtool is already present.
set -uo pipefail

command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && exit 0

say() { echo "[setup] $*"; }
if ! command -v apt-get >/dev/null 2>&1; then
  say "prometheus/promtool not installed (no apt-get); observability tests will be skipped"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  AS_ROOT=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  AS_ROOT=(sudo -n)
else
  say "prometheus/promtool not installed (not root, no passwordless sudo); observability tests will be skipped"
  exit 0
fi

say "installing prometheus + promtool (Debian package)"
export DEBIAN_FRONTEND=noninteractive
# Containers have no init system: a policy-rc.d that forbids service starts keeps the package's
# postinst from trying (and possibly waiting) to start the daemon. Only created if absent.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${AS_ROOT[@]}" tee "$policy" >/dev/null && "${AS_ROOT[@]}" chmod +x "$policy" && made_policy=1
fi
log=$(mktemp)
if "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive timeout 120 apt-get update -q >"$log" 2>&1 \
  && "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends \
       -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold prometheus >>"$log" 2>&1 </dev/null; then
  say "prometheus $(prometheus --version 2>&1 | head -n1 | awk '{print $3}') installed"
else
  say "could not install prometheus (see below); observability tests will be skipped"
  tail -n 5 "$log" | sed 's/^/[setup]   /'
fi
rm -f "$log"
[ "$made_policy" -eq 1 ] && "${AS_ROOT[@]}" rm -f "$policy"
exit 0
