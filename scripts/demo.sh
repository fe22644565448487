#!/usr/bin/env bash
# The demo: a leaking program without a quota, then under `heapcap run --limit 64Mi`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet -p heapcap
exec target/release/heapcap demo
