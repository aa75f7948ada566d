#!/usr/bin/env bash
# Prepares (once, cached) what the nested SVM test host needs from Debian: the stock kernel
# (linux-image-amd64's current image) with the modules an L1 host loads, and a static busybox.
# Prints the cache directory on stdout. The L1 host itself is assembled and booted by the test
# harness (crates/worker/tests/common/nested.rs) or by scripts/nested/run.sh.
#
# Cache: $FERRY_NESTED_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/ferry-nested. Needs
# apt-get (download only: nothing is installed) the first time.
set -euo pipefail
C=${FERRY_NESTED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry-nested}
mkdir -p "$C"
cd "$C"
if [ ! -f ready ]; then
  echo "nested: preparing the L1 kernel and busybox in $C" >&2
  rm -rf pkgs k bb && mkdir pkgs
  img=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  if [ -z "$img" ]; then
    apt-get update -qq >&2
    img=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  fi
  [ -n "$img" ] || { echo "nested: cannot find Debian's linux-image-amd64 kernel package" >&2; exit 1; }
  (cd pkgs && apt-get download -qq "$img" busybox-static >&2) || {
    apt-get update -qq >&2
    (cd pkgs && apt-get download -qq "$img" busybox-static >&2)
  }
  for f in pkgs/linux-image-*.deb; do dpkg -x "$f" k; done
  dpkg -x pkgs/busybox-static_*.deb bb
  K=$(ls k/lib/modules)
  cp k/boot/vmlinuz-"$K" vmlinuz
  mkdir -p mods
  # KVM on AMD SVM, and virtio-net over PCI for the two-host bed.
  for m in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko drivers/crypto/ccp/ccp.ko \
           arch/x86/kvm/kvm-amd.ko drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
           drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko \
           drivers/virtio/virtio_pci.ko net/core/failover.ko drivers/net/net_failover.ko \
           drivers/net/virtio_net.ko; do
    src="k/lib/modules/$K/kernel/$m"
    if [ -f "$src.xz" ]; then xz -dc "$src.xz" > "mods/$(basename "$m")";
    elif [ -f "$src" ]; then cp "$src" mods/;
    else echo "nested: module $m not in $img" >&2; exit 1; fi
  done
  cp bb/bin/busybox busybox
  echo "$K" > kernel-release
  rm -rf k bb
  touch ready
fi
echo "$C"
