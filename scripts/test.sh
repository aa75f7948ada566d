#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test (real KVM, real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /dev/kvm ]; then
  echo "test: /dev/kvm is missing: Ferry's tests run real KVM guests and need it" >&2
  exit 1
fi
scripts/install-deps.sh
cargo fmt --all -- --check
# The test build compiles in the typed fault-injection points (contract::faults) that the
# fault-matrix tests arm; production builds (scripts/demo.sh, cargo build) never have them.
FEATURES=(--features contract/fault-injection)
cargo clippy --release --workspace --all-targets "${FEATURES[@]}" -- -D warnings
# The web console's component and logic tests (Vitest in jsdom); its browser test against a
# real cluster is crates/cli/tests/console.rs, in the cargo run below.
(cd web && node_modules/.bin/vitest run --reporter=dot)
# One test at a time: the machines have 2 cores, most tests run guests with busy vCPUs, and
# several assert on timing the guest itself observed (heartbeat gaps across a migration).
cargo test --release --workspace "${FEATURES[@]}" -- --test-threads=1
# Coverage-guided fuzzing (libFuzzer on stable, fuzz/README.md) of the wire, snapshot and
# device-state decoders: every committed seed and past reproducer once, then a bounded run.
scripts/fuzz.sh replay
scripts/fuzz.sh "${FERRY_FUZZ_SECONDS:-30}"
