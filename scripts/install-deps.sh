#!/usr/bin/env bash
# Installs what Ferry's tests and benchmarks need on a fresh Debian machine of this project's
# kind (run as root). Idempotent: packages already present are not reinstalled, and apt-get
# update runs only when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The web console's npm packages (web/package-lock.json pins them; the agent's build compiles
# the console from web/src with them). `install-deps.sh web` installs only these (no root).
web_deps() {
  command -v npm >/dev/null || { echo "install-deps: npm is missing (Node.js 20 or later with npm)" >&2; exit 1; }
  if [ ! -e web/node_modules/.package-lock.json ] || [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; then
    echo "install-deps: npm ci in web/"
    (cd web && npm ci --no-audit --no-fund --loglevel=error)
  fi
}
if [ "${1:-}" = web ]; then
  web_deps
  exit 0
fi

# Debian packages: QEMU is the side-by-side baseline (boot test and benchmarks); etcd-server
# backs the cluster store tests (the tests start their own etcd; the packaged service is not used);
# iproute2 (ip netns/link/addr, bridges, veths), util-linux (nsenter, unshare) and mount
# (mount, umount: the test bed's shared storage) build the network-namespace test bed of the
# storage/network tests and `ferry bench-net`. Nothing pings with an external `ping`
# (iputils-ping is not on a fresh machine): reachability is checked with Ferry's own prober.
# chromium is the browser the web console's tests drive (playwright-core, no browser download).
PACKAGES=(qemu-system-x86 etcd-server iproute2 util-linux mount chromium)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
web_deps
command -v cargo >/dev/null || { echo "install-deps: cargo is missing (Rust toolchain required)" >&2; exit 1; }
echo "install-deps: ok"
