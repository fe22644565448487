#!/usr/bin/env bash
# Install what heapcap's build, demo and tests need on a fresh Debian machine (idempotent).
set -euo pipefail

packages=(
  libseccomp-dev   # libseccomp-rs links to it
  pkg-config
  gcc              # test fixtures
  gcc-multilib     # 32-bit (i386) fixtures: gcc -m32
  python3          # python3 under a quota (/usr/bin/python3)
  protobuf-compiler # protoc: the k8s-cri crate of the CRI test (integration/tests/cri) builds the CRI API with it
  binutils         # strip and readelf for scripts/image.sh
  openjdk-17-jdk-headless # integration/tests/machine.rs: the JVM sizes its heap from the quota (javac builds its Leak.java)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "${1:-}" = "--ci" ] && ! command -v cargo-deny >/dev/null 2>&1; then
  echo "setup: installing cargo-deny" >&2
  cargo install --locked --quiet cargo-deny
fi

# scripts/fuzz.sh: cargo-fuzz at a pinned version (replacing any other version).
cargo_fuzz_version=0.13.2
if [ "${1:-}" = "--ci" ] && [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $cargo_fuzz_version" ]; then
  echo "setup: installing cargo-fuzz $cargo_fuzz_version" >&2
  cargo install --locked --quiet --force cargo-fuzz --version "$cargo_fuzz_version"
fi

# integration/tests/monitoring.rs: promtool checks examples/monitoring/'s alert rules. Debian ships
# it inside the Prometheus server's package, whose installation would also start a server: only
# promtool is taken out of the package (apt-get download, no dpkg install).
if [ "${1:-}" = "--ci" ] && ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install promtool in /usr/local/bin" >&2
    exit 1
  fi
  echo "setup: installing promtool (from Debian's prometheus package)" >&2
  tmp=$(mktemp -d)
  chmod 0755 "$tmp" # apt-get download drops to the _apt user where it can
  if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
    apt-get update -qq
    (cd "$tmp" && apt-get download -qq prometheus)
  fi
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  install -m 0755 "$tmp/usr/bin/promtool" /usr/local/bin/promtool
  rm -rf "$tmp"
  promtool --version >/dev/null
fi
