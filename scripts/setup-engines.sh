#!/usr/bin/env bash
# Install the container engines heapcap-runtime's tests drive besides runc, crun and podman
# (scripts/setup-runtimes.sh): containerd with ctr, and dockerd. Run as root, after
# setup-runtimes.sh; idempotent.
#
#   containerd   Debian's containerd 1.6 (bookworm) with `ctr`. The tests start their own
#                containerd on private paths (--config with root, state and socket under /tmp) and
#                stop it; the system service the package installs is not used and not needed.
#   docker.io    Debian's dockerd 20.10 (and a docker client). The Docker test starts its own dockerd
#                (private --data-root, --exec-root, socket; --bridge none, no iptables, vfs storage),
#                which starts its own containerd; the system services are not used.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    echo "setup-engines.sh: run as root (it installs packages)" >&2
    exit 1
fi

missing=()
command -v containerd >/dev/null || missing+=(containerd)
command -v ctr >/dev/null || missing+=(containerd)
command -v dockerd >/dev/null || missing+=(docker.io)
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

containerd --version
ctr --version
dockerd --version
