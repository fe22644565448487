#!/usr/bin/env bash
# Fuzz every parser (`cargo fuzz list` in fuzz/) for a fixed budget each, as CI does; fail on any crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 20)
#
# Runs on the stable toolchain: cargo-fuzz passes nightly-only flags (-Zsanitizer=address,
# -Cpasses=sancov-module, ...), which RUSTC_BOOTSTRAP=1 lets stable rustc take; stable ships the
# AddressSanitizer runtime, so targets run under ASan (FUZZ_SANITIZER=none to build without it).
# The committed seeds in fuzz/corpus/<target>/ are read, never written: what a run finds goes to a
# temporary directory. A crashing input is kept in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
budget="${1:-20}"
sanitizer="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is not installed: run scripts/setup.sh --ci" >&2
  exit 1
fi

step() { echo "== $*" >&2; "$@"; }
# fuzz/ is its own workspace: the main workspace's fmt and clippy do not cover it.
step cargo fmt --manifest-path fuzz/Cargo.toml -- --check
step cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked --quiet -- -D warnings
step cargo fuzz build --fuzz-dir fuzz -s "$sanitizer"

start=$SECONDS
failed=()
for target in $(cargo fuzz list --fuzz-dir fuzz); do
  new_corpus=$(mktemp -d)
  artifacts="fuzz/artifacts/$target"
  mkdir -p "$artifacts"
  before=$(ls "$artifacts")
  echo "== fuzz $target for ${budget}s" >&2
  log=$(mktemp)
  if cargo fuzz run --fuzz-dir fuzz -s "$sanitizer" "$target" "$new_corpus" "fuzz/corpus/$target" -- \
    -max_total_time="$budget" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)|^Done [0-9]+ runs' "$log" >&2 || true
  else
    failed+=("$target")
    tail -n 80 "$log" >&2
    for input in $(comm -13 <(printf "%s\n" $before | sort) <(ls "$artifacts" | sort)); do
      echo "fuzz: $target crashed on $artifacts/$input" >&2
      echo "fuzz: reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -s $sanitizer $target $artifacts/$input" >&2
    done
  fi
  rm -rf "$new_corpus" "$log"
done

echo "fuzz: ran every target for ${budget}s in $((SECONDS - start))s" >&2
if ((${#failed[@]})); then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
