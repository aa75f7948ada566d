#!/usr/bin/env bash
# Coverage-guided fuzzing of Ferry's untrusted-input decoders (libFuzzer, stable Rust only).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   fuzz each target (default 60 s; all targets)
#   scripts/fuzz.sh replay [TARGET...]                 run every committed corpus input and every
#                                                      saved reproducer (fuzz/crashes/) once
#
# Targets: wire_frame, snapshot, device_state (fuzz/fuzz_targets/; harnesses in fuzz/src/).
# Builds fuzz/ (a standalone cargo package) with the sancov instrumentation cargo-fuzz uses,
# as plain codegen flags, so neither nightly nor cargo-fuzz is needed; libfuzzer-sys compiles
# libFuzzer itself (needs a C++ compiler). Each target runs on a copy of fuzz/corpus/<target>/
# (the repository is never modified); the script prints how to merge what it found. A crash,
# timeout or OOM makes it exit non-zero; the input is saved under
# $CARGO_TARGET_DIR/artifacts/<target>/ and its path printed.
#
# Environment: CARGO_TARGET_DIR (default fuzz/target), FUZZ_WORK_DIR (where corpus copies and
# logs go; default a fresh temporary directory, kept), FUZZ_ARGS (extra libFuzzer flags),
# FERRY_FUZZ_MALLOC_LIMIT_MB (largest single allocation, default 256).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$root/fuzz"
all_targets=(wire_frame snapshot device_state)

replay=false
secs=60
if [ "${1:-}" = replay ]; then
  replay=true
  shift
elif [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  secs=$1
  shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  [[ " ${all_targets[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target $t (known: ${all_targets[*]})" >&2; exit 2; }
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$fuzz/target}"
triple=$(rustc -vV | sed -n 's/^host: //p')
# What cargo-fuzz passes (src/project.rs, default build: release + debug assertions), minus
# the sanitizer (a nightly-only -Z flag): SanitizerCoverage with inline 8-bit counters, the PC
# table and comparison tracing for libFuzzer's feedback, stack-depth tracking, --cfg fuzzing,
# debug assertions and overflow checks (an overflow is a finding). --target keeps these flags
# away from build scripts and proc macros.
flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  --cfg fuzzing
  -Clink-dead-code
  -Cdebug-assertions
  -Coverflow-checks
)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
echo "fuzz.sh: building ${targets[*]} (target dir $CARGO_TARGET_DIR)"
t0=$(date +%s)
RUSTFLAGS="${flags[*]}" cargo build --manifest-path "$fuzz/Cargo.toml" --release \
  --target "$triple" "${bins[@]}"
echo "fuzz.sh: built in $(( $(date +%s) - t0 )) s"
bindir="$CARGO_TARGET_DIR/$triple/release"

scratch=$(mktemp -d /dev/shm/ferry-fuzz.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export FERRY_FUZZ_SCRATCH="$scratch"

if $replay; then
  failed=0
  for t in "${targets[@]}"; do
    files=()
    for d in "$fuzz/corpus/$t" "$fuzz/crashes/$t"; do
      [ -d "$d" ] && while IFS= read -r -d '' f; do files+=("$f"); done < <(find "$d" -type f ! -name '*.md' -print0)
    done
    [ ${#files[@]} -gt 0 ] || continue
    if "$bindir/$t" -rss_limit_mb=2048 -timeout=10 "${files[@]}" >"$scratch/$t.log" 2>&1; then
      echo "$t: ${#files[@]} inputs replayed, no crash"
    else
      echo "$t: CRASH replaying (log below)"; grep -E "panicked at|==ferry-fuzz==|ERROR|Running:" "$scratch/$t.log" | head -20
      failed=1
    fi
  done
  exit $failed
fi

work="${FUZZ_WORK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ferry-fuzz-work.XXXXXX")}"
mkdir -p "$work"
failed=0
summary=()
for t in "${targets[@]}"; do
  corpus="$work/$t/corpus"
  artifacts="$CARGO_TARGET_DIR/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  [ -d "$fuzz/corpus/$t" ] && cp -r "$fuzz/corpus/$t/." "$corpus/"
  before=$(find "$corpus" -type f | wc -l)
  marker="$work/$t/.start"
  touch "$marker"
  log="$work/$t/fuzz.log"
  echo "fuzz.sh: $t for ${secs} s (log $log)"
  rc=0
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  "$bindir/$t" "$corpus" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1 || rc=$?
  after=$(find "$corpus" -type f | wc -l)
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  line="$t: $(stat number_of_executed_units) execs ($(stat average_exec_per_sec)/s), cov ${cov:-?} edges, ft ${ft:-?}, $((after - before)) new corpus units ($after total), peak RSS $(stat peak_rss_mb) MB"
  crashes=$(find "$artifacts" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) -newer "$marker" | sort)
  if [ "$rc" -ne 0 ] || [ -n "$crashes" ]; then
    failed=1
    line="$line — FAILED (exit $rc)"
    echo "$line"
    grep -E "panicked at|==ferry-fuzz==|==[0-9]+== ERROR|SUMMARY|Test unit written" -A2 "$log" | head -30 || true
    for c in $crashes; do
      echo "  input: $c"
      echo "  reproduce: $bindir/$t $c"
      echo "  minimize:  $bindir/$t -minimize_crash=1 -max_total_time=60 -exact_artifact_path=$c.min $c"
    done
  else
    echo "$line"
  fi
  summary+=("$line")
done

echo
echo "fuzz.sh: summary"
printf '  %s\n' "${summary[@]}"
echo "fuzz.sh: corpus copies and logs in $work; to keep the inputs that add coverage:"
for t in "${targets[@]}"; do
  echo "  $bindir/$t -merge=1 $fuzz/corpus/$t $work/$t/corpus"
done
exit $failed
