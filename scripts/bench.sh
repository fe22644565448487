#!/usr/bin/env bash
# heapcap's benchmarks (issue 7), in one command: builds the release binaries and runs the
# harness, which writes results/bench.md and results/*.svg. Run as root (containers, seccomp);
# needs gcc with static glibc, runc, prlimit; python3 and node are measured when present.
#
#   scripts/bench.sh            # the full run (about an hour on a 2-core VM)
#   scripts/bench.sh --tiny     # seconds, debug build: checks the harness still runs (CI); its
#                               # figures mean nothing and go to $TMPDIR, not results/
#
# Other arguments go to heapcap-bench (`heapcap-bench --help`), e.g. `--only 1,3 --rounds 5`.
# It exits non-zero when the harness breaks, never because of a figure.
set -euo pipefail
cd "$(dirname "$0")/.."
out=(--out results)
profile=release
for a in "$@"; do
    case "$a" in
    --tiny)
        out=(--out "${TMPDIR:-/tmp}/heapcap-bench-tiny")
        profile=dev
        ;;
    --out | --out=*) out=() ;; # the caller's own
    esac
done
cargo build --profile "$profile" --locked -q -p heapcap -p heapcapd -p heapcap-holder -p heapcap-hook -p heapcap-runtime -p heapcap-bench
dir=target/$([ "$profile" = dev ] && echo debug || echo release)
exec "$dir/heapcap-bench" --bin-dir "$dir" "${out[@]}" --command-line "$(echo scripts/bench.sh "$@")" "$@"
