#!/usr/bin/env bash
# Ferry's main job, on one machine: boot the test guest, snapshot it mid-flight, restore it in a
# new worker process, and show that the guest simply continued.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -e /dev/kvm ] || { echo "demo: /dev/kvm is missing (Ferry needs KVM)" >&2; exit 1; }
cargo build --release -q -p worker
BIN=target/release/ferry-vmm
DIR=$(mktemp -d /tmp/ferry-demo.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

echo "== booting a 2-vCPU, 256 MiB test guest that rewrites and verifies 64 MiB of its memory"
$BIN run --kernel test-guest --vcpus 2 --memory-mib 256 \
  --cmdline "ferry.workload=verify ferry.wss_mib=64 ferry.hb_ms=100" \
  --serial-log "$DIR/a.log" --api-socket "$DIR/a.sock" 2>/dev/null &
for _ in $(seq 100); do grep -q "^verify ok" "$DIR/a.log" 2>/dev/null && break; sleep 0.1; done
sleep 1
echo "== pausing and taking a snapshot"
$BIN ctl --api-socket "$DIR/a.sock" pause >/dev/null
$BIN ctl --api-socket "$DIR/a.sock" snapshot "$DIR/vm.snap" | grep -E '"(file_bytes|data_pages|total_pages|write_seconds)"'
echo "-- last lines of the first worker's guest:"
tail -n 4 "$DIR/a.log"
$BIN ctl --api-socket "$DIR/a.sock" shutdown >/dev/null; wait
echo "== restoring the snapshot in a new worker process"
$BIN restore --snapshot "$DIR/vm.snap" --serial-log "$DIR/b.log" --api-socket "$DIR/b.sock" 2>/dev/null &
sleep 2
echo "-- first lines of the restored guest (counters continue by one):"
head -n 6 "$DIR/b.log"
$BIN ctl --api-socket "$DIR/b.sock" shutdown >/dev/null; wait
if grep -q CORRUPT "$DIR/a.log" "$DIR/b.log"; then echo "== verifier found corruption"; exit 1; fi
echo "== guest verifier: $(grep -c '^verify ok' "$DIR/b.log") clean sweeps after restore, no corruption"
