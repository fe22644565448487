#!/usr/bin/env bash
# Every check and test heapcap has, as CI runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --ci
# Container runtimes and this machine's gotchas (crun on hybrid cgroups, podman ulimits).
scripts/setup-runtimes.sh
# containerd + ctr and dockerd for heapcap-runtime's tests (they start their own, on private paths).
scripts/setup-engines.sh

step() { echo "== $*" >&2; "$@"; }
step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets --locked -- -D warnings
step env RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked --quiet
# Advisories need the RustSec database from GitHub, which is out of reach here (see deny.toml).
step cargo deny --log-level error check bans licenses sources
step cargo test --workspace --locked
step scripts/fuzz.sh  # every parser fuzzed for 20 s (fuzz/, cargo-fuzz on stable with RUSTC_BOOTSTRAP=1)
# The benchmark harness still runs (a tiny configuration; benchmarks never fail on a number).
step scripts/bench.sh --tiny
