#!/usr/bin/env bash
# Ferry's main job: a local 3-node cluster (agents on loopback, the embedded store, a temporary
# directory) live-migrates a running VM node1 -> node2 -> node3 and shows the guest never
# noticed. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -e /dev/kvm ] || { echo "demo: /dev/kvm is missing (Ferry needs KVM)" >&2; exit 1; }
scripts/install-deps.sh web   # the web console's npm packages (no root needed)
cargo build --release -q -p worker -p cli
exec target/release/ferry demo "$@"
