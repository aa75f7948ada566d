#!/usr/bin/env bash
# Live migration between bare worker processes (no cluster, no agents): A -> B -> C, showing
# that the guest did not notice (its heartbeats and memory verifier go on).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -e /dev/kvm ] || { echo "demo: /dev/kvm is missing (Ferry needs KVM)" >&2; exit 1; }
cargo build --release -q -p worker
BIN=target/release/ferry-vmm
DIR=$(mktemp -d /tmp/ferry-demo.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

receiver() { # name: starts a worker waiting for a VM; its address goes to $ADDR
  $BIN receive --insecure --listen 127.0.0.1:0 --serial-log "$DIR/$1.log" --api-socket "$DIR/$1.sock" \
    > "$DIR/$1.out" 2> "$DIR/$1.err" &
  for _ in $(seq 100); do grep -q "receiving on" "$DIR/$1.out" 2>/dev/null && break; sleep 0.05; done
  ADDR=$(sed -n 's/^receiving on //p' "$DIR/$1.out")
}

echo "== worker A: a 2-vCPU, 256 MiB VM whose guest rewrites and verifies 64 MiB of its memory"
$BIN run --kernel test-guest --vcpus 2 --memory-mib 256 \
  --cmdline "ferry.workload=verify ferry.wss_mib=64 ferry.hb_ms=100" \
  --serial-log "$DIR/A.log" --api-socket "$DIR/A.sock" 2> "$DIR/A.err" &
for _ in $(seq 100); do grep -q "^verify ok" "$DIR/A.log" 2>/dev/null && break; sleep 0.1; done
sleep 1
tail -n 3 "$DIR/A.log"

receiver B
echo
echo "== live migration A -> B ($ADDR)"
$BIN ctl --api-socket "$DIR/A.sock" migrate --to "$ADDR" --insecure
sleep 1
echo "-- the guest, now on B:"
tail -n 3 "$DIR/B.log"

receiver C
echo
echo "== live migration B -> C ($ADDR), 4 streams, lz4"
$BIN ctl --api-socket "$DIR/B.sock" migrate --to "$ADDR" --insecure --streams 4 --compress lz4
sleep 1
echo "-- the guest, now on C:"
tail -n 3 "$DIR/C.log"
$BIN ctl --api-socket "$DIR/C.sock" shutdown > /dev/null
sleep 0.5

echo
python3 - "$DIR" <<'PY'
import sys, re
d = sys.argv[1]
text = "".join(open(f"{d}/{n}.log").read() for n in "ABC")
hb = {}
for m in re.finditer(r"^hb (\d+) (\d+) (\d+)$", text, re.M):
    hb.setdefault(int(m[1]), []).append(int(m[2]))
gaps = sum(1 for c in hb.values() for a, b in zip(c, c[1:]) if b != a + 1)
ok = len(re.findall(r"^verify ok", text, re.M))
bad = len(re.findall(r"^verify (CORRUPT|bad)", text, re.M))
print(f"== guest across A, B, C: heartbeat counters {'continuous' if gaps == 0 else f'BROKEN ({gaps} jumps)'} "
      f"({', '.join(f'cpu {c}: 1..{v[-1]}' for c, v in sorted(hb.items()))}); "
      f"{ok} clean verifier sweeps, {bad} corrupt")
sys.exit(1 if gaps or bad else 0)
PY
