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

# Huge pages for guest RAM (vmm::memory: a VM whose RAM fits in the pool's free pages gets 2 MiB
# pages, others 4 KiB). FERRY_HUGEPAGES_MIB (default 4096) of the machine's 24 GiB are
# reserved, then touched once so that the host behind this machine backs them: first touch
# of such a page is 10-30x faster than of a fresh 4 KiB page here, and a migration's
# destination touches all of its RAM in pass 0. Best effort: a kernel that cannot reserve
# them (fragmented memory, no permission) leaves VMs on 4 KiB pages.
want=$(( ${FERRY_HUGEPAGES_MIB:-4096} / 2 ))
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt "$want" ]; then
  echo "$want" > /proc/sys/vm/nr_hugepages 2>/dev/null || true
  python3 - <<'PY' || echo "install-deps: could not touch the huge page pool (VMs still use it)"
import os
free = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("HugePages_Free:")))
if free:
    fd = os.memfd_create("ferry-warm", os.MFD_HUGETLB | os.MFD_CLOEXEC)
    os.ftruncate(fd, free << 21)
    os.posix_fallocate(fd, 0, free << 21)
    os.close(fd)
PY
  echo "install-deps: huge pages: $(awk '/HugePages_Total/ {print $2}' /proc/meminfo) x 2 MiB reserved"
fi
# Transparent huge pages for shared memory where a mapping asks for them (MADV_HUGEPAGE), as
# Ferry's 4 KiB-page guest RAM (a memfd) does when the pool above cannot hold a guest: a
# first touch then allocates 2 MiB at once. Debian's default is `never`.
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [ -w "$thp" ] && grep -q '\[never\]' "$thp"; then
  echo advise > "$thp" 2>/dev/null || true
  echo "install-deps: transparent huge pages for shared memory: $(sed 's/.*\[\(.*\)\].*/\1/' "$thp")"
fi
command -v cargo >/dev/null || { echo "install-deps: cargo is missing (Rust toolchain required)" >&2; exit 1; }
echo "install-deps: ok"
