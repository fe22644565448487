#!/usr/bin/env bash
# Build heapcap's container image (the one examples/kubernetes/daemonset.yaml runs) from the
# release binaries and the host's static busybox, with no registry and no `docker build`:
#
#   scripts/image.sh [--out FILE]      # default: $CARGO_TARGET_DIR/image/heapcap-VERSION.tar
#
# The image, localhost/heapcap:VERSION (VERSION from Cargo.toml), has one layer:
#   /opt/heapcap/bin/   heapcapd, heapcap-holder, heapcap, heapcap-runtime, heapcap-hook: release
#                       builds linked statically (glibc's static-pie and libseccomp.a, from libc6-dev
#                       and libseccomp-dev), so they run in the image, which has no libc, and on any
#                       x86_64 node the DaemonSet copies them to, whatever its glibc or libseccomp;
#                       debug info stripped, symbols kept
#   /bin/               busybox (static) and a link per applet: /bin/sh for the install script
#   /etc/passwd, /etc/group (root), and empty /tmp, /proc, /sys, /dev, /run
# and runs /opt/heapcap/bin/heapcapd by default.
#
# FILE is one tar archive that is both an OCI image layout (oci-layout, index.json, blobs/) and a
# `docker save` archive (manifest.json naming the same blobs), as Docker 25+ writes them, so each
# engine loads it as it is:
#   ctr -n k8s.io images import FILE      (containerd, what kubelet uses; name from index.json)
#   podman load -i FILE
#   docker load -i FILE                   (Docker 20.10 and later)
# then push it to your registry, or load it on every node and keep imagePullPolicy IfNotPresent.
#
# The archive is reproducible: files, times (the last commit's, or SOURCE_DATE_EPOCH) and owners
# are fixed, so the same binaries give the same digests. Needs cargo, tar, gzip, sha256sum,
# strip (binutils), libc6-dev and libseccomp-dev (scripts/setup.sh) and busybox-static
# (scripts/setup-runtimes.sh). The static build goes to $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/
# (an explicit --target, so that the static flag reaches no build script or proc macro) and leaves
# the usual release build alone.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "image.sh: $*" >&2
  exit 1
}

out=""
while (($#)); do
  case "$1" in
  --out)
    [ $# -ge 2 ] || die "--out needs a file name"
    out=$2
    shift 2
    ;;
  --out=*)
    out=${1#--out=}
    shift
    ;;
  -h | --help)
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown argument '$1' (scripts/image.sh [--out FILE])" ;;
  esac
done

for tool in cargo tar gzip sha256sum strip readelf; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
busybox=""
for candidate in /bin/busybox /usr/bin/busybox /sbin/busybox /usr/sbin/busybox; do
  if [ -x "$candidate" ]; then
    busybox=$candidate
    break
  fi
done
[ -n "$busybox" ] || die "no busybox: install busybox-static (scripts/setup-runtimes.sh)"
if readelf -l "$busybox" 2>/dev/null | grep -q 'Requesting program interpreter'; then
  die "$busybox is dynamically linked: install busybox-static (it replaces the dynamic busybox)"
fi

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || die "no version in Cargo.toml's [workspace.package]"
name="localhost/heapcap:$version"
target=${CARGO_TARGET_DIR:-$PWD/target}
out=${out:-$target/image/heapcap-$version.tar}
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

[ "$(uname -m)" = x86_64 ] || die "builds x86_64 images only (this is $(uname -m))"
triple=x86_64-unknown-linux-gnu
binaries=(heapcapd heapcap-holder heapcap heapcap-runtime heapcap-hook)
echo "image.sh: building ${binaries[*]} (release, static)" >&2
LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=${LIBSECCOMP_LIB_PATH:-/usr/lib/x86_64-linux-gnu} \
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked -q --target "$triple" $(printf -- '-p %s ' "${binaries[@]}")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root/opt/heapcap/bin" "$root/bin" "$root/etc" "$root/proc" "$root/sys" "$root/dev" "$root/run" "$root/tmp"
chmod 1777 "$root/tmp"
for b in "${binaries[@]}"; do
  if readelf -l "$target/$triple/release/$b" | grep -q 'Requesting program interpreter'; then
    die "$b was linked dynamically: the image has no libc for it"
  fi
  strip --strip-debug -o "$root/opt/heapcap/bin/$b" "$target/$triple/release/$b"
  chmod 0755 "$root/opt/heapcap/bin/$b"
done
cp "$busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

# The layer: a tar of the root, entries sorted, owned by root, with one time.
layout=$work/layout
blobs=$layout/blobs/sha256
mkdir -p "$blobs"
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=pax \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"
layer=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$blobs/$layer"

# Writes stdin to a blob; prints its digest (hex) and size.
blob() {
  local tmp=$work/blob digest
  cat >"$tmp"
  digest=$(sha256sum "$tmp" | cut -d' ' -f1)
  mv "$tmp" "$blobs/$digest"
  echo "$digest $(stat -c %s "$blobs/$digest")"
}

read -r config config_size < <(
  printf '%s' '{"architecture":"amd64","os":"linux","created":"'"$created"'",' \
    '"config":{"Env":["PATH=/opt/heapcap/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],' \
    '"Entrypoint":[],"Cmd":["/opt/heapcap/bin/heapcapd"],' \
    '"Labels":{"org.opencontainers.image.title":"heapcap","org.opencontainers.image.version":"'"$version"'"}},' \
    '"rootfs":{"type":"layers","diff_ids":["sha256:'"$diff_id"'"]},' \
    '"history":[{"created":"'"$created"'","created_by":"scripts/image.sh"}]}' | blob
)
read -r manifest manifest_size < <(
  printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
    '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config"'","size":'"$config_size"'},' \
    '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer"'","size":'"$layer_size"'}]}' |
    blob
)
printf '%s\n' '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
printf '%s\n' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[' \
  '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$manifest"'","size":'"$manifest_size"',' \
  '"annotations":{"io.containerd.image.name":"'"$name"'","org.opencontainers.image.ref.name":"'"$version"'"}}]}' |
  tr -d '\n' >"$layout/index.json"
printf '%s' '[{"Config":"blobs/sha256/'"$config"'","RepoTags":["'"$name"'"],"Layers":["blobs/sha256/'"$layer"'"]}]' \
  >"$layout/manifest.json"

mkdir -p "$(dirname "$out")"
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=ustar -C "$layout" \
  -cf "$out.tmp" oci-layout index.json manifest.json blobs
mv -f "$out.tmp" "$out"
echo "image.sh: $name in $out ($(du -h "$out" | cut -f1); layer sha256:$layer, $(du -h "$work/layer.tar" | cut -f1) unpacked)" >&2
echo "$out"
