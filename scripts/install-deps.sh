#!/usr/bin/env bash
# Installs what Ferry's tests and benchmarks need on a fresh Debian machine of this project's
# kind (run as root). Idempotent: packages already present are not reinstalled, and apt-get
# update runs only when something is missing.
set -euo pipefail

# Debian packages: QEMU is the side-by-side baseline (boot test and benchmarks); etcd-server
# backs the cluster store tests (the tests start their own etcd; the packaged service is not used);
# iproute2 (ip netns/link/addr, bridges, veths), util-linux (nsenter, unshare) and mount
# (mount, umount: the test bed's shared storage) build the network-namespace test bed of the
# storage/network tests and `ferry bench-net`. Nothing pings with an external `ping`
# (iputils-ping is not on a fresh machine): reachability is checked with Ferry's own prober.
PACKAGES=(qemu-system-x86 etcd-server iproute2 util-linux mount)

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
command -v cargo >/dev/null || { echo "install-deps: cargo is missing (Rust toolchain required)" >&2; exit 1; }
echo "install-deps: ok"
