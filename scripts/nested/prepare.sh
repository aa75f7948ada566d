#!/usr/bin/env bash
# Prepares (once, cached) what the nested SVM test host needs from Debian: the stock kernel
# (linux-image-amd64's current image) with the modules an L1 host loads, and a static busybox.
# It also extracts the modules an L2 Linux guest of Ferry needs from the same kernel package
# (virtio-mmio, virtio-blk, virtio-net) into l2mods/, in load order (l2mods/order).
# Prints the cache directory on stdout. The L1 host itself is assembled and booted by the test
# harness (crates/worker/tests/nested/mod.rs).
#
# Cache: $FERRY_NESTED_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/ferry-nested. Needs
# apt-get (download only: nothing is installed) the first time.
set -euo pipefail
C=${FERRY_NESTED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry-nested}
mkdir -p "$C"
cd "$C"
# The marker names the cache layout: a cache made by an older version of this script is
# refreshed (the downloaded packages are kept).
MARK=ready-3
if [ ! -f $MARK ]; then
  echo "nested: preparing the L1 kernel and busybox in $C" >&2
  rm -rf k bb && mkdir -p pkgs
  if ls pkgs/linux-image-*.deb pkgs/busybox-static_*.deb >/dev/null 2>&1; then
    img=$(ls pkgs/linux-image-*.deb | head -1)
  else
    rm -rf pkgs && mkdir pkgs
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
  fi
  for f in pkgs/linux-image-*.deb; do dpkg -x "$f" k; done
  dpkg -x pkgs/busybox-static_*.deb bb
  K=$(ls k/lib/modules)
  cp k/boot/vmlinuz-"$K" vmlinuz
  mkdir -p mods l2mods
  take() { # take DIR MODULE...: copies (decompressed) modules out of the package into DIR
    local d=$1 m src; shift
    for m in "$@"; do
      src="k/lib/modules/$K/kernel/$m"
      if [ -f "$src.xz" ]; then xz -dc "$src.xz" > "$d/$(basename "$m")";
      elif [ -f "$src" ]; then cp "$src" "$d/";
      else echo "nested: module $m not in $img" >&2; exit 1; fi
    done
  }
  # L1: KVM on AMD SVM; virtio-net over PCI for the two-host bed; TAP + bridge for L2 NICs.
  take mods virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko drivers/crypto/ccp/ccp.ko \
           arch/x86/kvm/kvm-amd.ko drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
           drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko \
           drivers/virtio/virtio_pci.ko net/core/failover.ko drivers/net/net_failover.ko \
           drivers/net/virtio_net.ko drivers/net/tun.ko net/llc/llc.ko net/802/stp.ko \
           net/bridge/bridge.ko
  # L2 (a Linux guest of Ferry): virtio-mmio transport, disk and NIC drivers, in load order.
  L2="drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_mmio.ko
      drivers/block/virtio_blk.ko net/core/failover.ko drivers/net/net_failover.ko
      drivers/net/virtio_net.ko"
  take l2mods $L2
  for m in $L2; do basename "$m" .ko; done > l2mods/order
  cp bb/bin/busybox busybox
  echo "$K" > kernel-release
  rm -rf k bb
  touch ready $MARK
fi
echo "$C"
