#!/usr/bin/env bash
# Prepare this machine for heapcap's container tests (integration/src/,
# integration/tests/harness_smoke.rs and the heapcapd tests): install the
# container runtimes and fix the host's known gotchas. Run as root, before the
# tests; idempotent (a second run changes nothing) and safe on a machine in use.
#
# What it does, and why:
#
# 1. Packages (Debian/Ubuntu), without Recommends:
#      runc, crun      the OCI runtimes the tests drive directly
#      podman          the engine the tests drive; pulls in conmon, the
#                      containers config (/etc/containers/policy.json,
#                      registries.conf, seccomp.json) and a network stack
#                      (netavark), which the tests do not use (--network none)
#      busybox-static  the containers' whole userland: the test root
#                      filesystem is busybox plus the static fixture
#      libc6-dev       libc.a, for build.rs's `gcc -static` fixture
#      python3, tar    a host program run inside containers; packing the
#                      podman test image
#      uidmap          rootless podman: newuidmap/newgidmap (setuid) map the
#                      user's subordinate ids into its user namespace
#      slirp4netns     rootless podman's network (the tests use --network
#                      none, but podman checks for it)
#      fuse-overlayfs  rootless podman's storage where the kernel's own
#                      overlay is not allowed to a user (podman may pick vfs)
#      systemd         systemd-analyze, which checks examples/systemd/user's
#                      unit as the rootless user reads it (no systemd runs)
#    Not needed: catatonit (--init), buildah, a registry (the image comes from
#    `podman import`).
#
# 2. cgroup v1/v2 hybrid hosts: crun 1.8 refuses to run anything while a
#    controller is still attached to the cgroup v2 hierarchy
#    ("cgroups in hybrid mode not supported, drop all controllers from
#    cgroupv2"). On this machine that controller is hugetlb, which systemd-less
#    boot left on /sys/fs/cgroup/unified. Mounting it on its own v1 hierarchy
#    (/sys/fs/cgroup/hugetlb, where runc and crun look for it) moves it off v2.
#    Done for every controller listed in unified/cgroup.controllers, and only
#    on hybrid hosts; pure v1 or pure v2 (unified) hosts need nothing. The
#    mount does not survive a reboot: run this script at every boot / CI job.
#
# 3. podman's ulimits: podman (as root) gives containers RLIMIT_NOFILE and
#    RLIMIT_NPROC of about 1M, which needs CAP_SYS_RESOURCE when that is above
#    the caller's hard limit; where the tests run without it (this machine)
#    every podman container fails with "crun: setrlimit `RLIMIT_NOFILE`:
#    Operation not permitted". Nothing to change on the host: the harness runs
#    podman with CONTAINERS_CONF=integration/containers/containers.conf
#    (default_ulimits nofile and nproc 1024:1024). This script only reports
#    the situation.
#
# 4. /etc/containers/policy.json (needed by `podman import`) is written with
#    Debian's default content only if it is missing (the package ships it).
#
# 5. Rootless podman (integration/tests/rootless.rs): a real non-root user,
#    heapcap-rootless (created if missing, with a home for podman's storage),
#    with 65536 subordinate uids and gids in /etc/subuid and /etc/subgid, and
#    its XDG_RUNTIME_DIR /run/user/UID (0700, its own), which systemd-logind
#    makes at login on other machines and nothing makes here. /run is a tmpfs:
#    run this script at every boot / CI job.
#
# Podman's storage (/var/lib/containers/storage, and the rootless user's
# ~/.local/share/containers/storage) is left to podman: it picks overlay, or
# vfs where overlay does not work.
set -euo pipefail

log() { echo "setup-runtimes: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and mounts cgroup hierarchies)"

# ------------------------------------------------------------------ packages
packages=(runc crun podman busybox-static libc6-dev python3 tar uidmap slirp4netns fuse-overlayfs systemd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for bin in runc crun podman busybox gcc tar python3 newuidmap newgidmap slirp4netns fuse-overlayfs systemd-analyze setpriv; do
  command -v "$bin" >/dev/null || die "$bin is not in PATH after installing ${packages[*]}"
done

# ------------------------------------------------------------------ cgroups
# Hybrid: /sys/fs/cgroup is a tmpfs of v1 hierarchies plus cgroup2 at unified/.
cgroup_fs=$(stat -fc %T /sys/fs/cgroup)
unified=/sys/fs/cgroup/unified
if [ "$cgroup_fs" = tmpfs ] && [ "$(stat -fc %T "$unified" 2>/dev/null || true)" = cgroup2fs ]; then
  read -r -a on_v2 <"$unified/cgroup.controllers" || true
  for controller in "${on_v2[@]}"; do
    target=/sys/fs/cgroup/$controller
    log "hybrid cgroups: moving the $controller controller from cgroup v2 to a v1 hierarchy at $target (crun needs v2 empty)"
    if [ ! -d "$target" ]; then
      if ! mkdir "$target" 2>/dev/null; then
        # systemd mounts the /sys/fs/cgroup tmpfs read-only.
        mount -o remount,rw /sys/fs/cgroup
        mkdir "$target"
        mount -o remount,ro /sys/fs/cgroup
      fi
    fi
    if mountpoint -q "$target"; then
      die "$target is already a mount point, but $controller is still on cgroup v2 ($unified/cgroup.controllers)"
    fi
    mount -t cgroup -o "$controller" cgroup "$target" ||
      die "cannot mount the $controller controller on $target (is it enabled in a cgroup v2 subtree_control?)"
  done
  left=$(cat "$unified/cgroup.controllers")
  [ -z "$left" ] || die "controllers still on cgroup v2 after the fix: $left; crun will refuse to run"
fi

# ------------------------------------------------------------------ containers config
if [ ! -e /etc/containers/policy.json ]; then
  log "writing /etc/containers/policy.json (missing; podman import needs it)"
  mkdir -p /etc/containers
  cat >/etc/containers/policy.json <<'EOF'
{
    "default": [
        {
            "type": "insecureAcceptAnything"
        }
    ]
}
EOF
fi

# ------------------------------------------------------------------ rootless podman's user
# The name is integration/src/rootless.rs's USER.
rootless_user=heapcap-rootless
if ! id -u "$rootless_user" >/dev/null 2>&1; then
  log "creating the user $rootless_user (rootless podman tests)"
  useradd --create-home --shell /usr/sbin/nologin --comment "heapcap rootless podman tests" "$rootless_user"
fi
rootless_uid=$(id -u "$rootless_user")
rootless_gid=$(id -g "$rootless_user")
[ "$rootless_uid" -ne 0 ] || die "$rootless_user has uid 0"
# A free range of 65536 ids above every range already given out, from 100000 (login.defs' default).
next_free_range() {
  awk -F: 'BEGIN { end = 100000 } NF == 3 && $2 + $3 > end { end = $2 + $3 } END { print end }' "$1" 2>/dev/null ||
    echo 100000
}
for map in subuid subgid; do
  file=/etc/$map
  touch "$file"
  if ! grep -q "^$rootless_user:" "$file" && ! grep -q "^$rootless_uid:" "$file"; then
    start=$(next_free_range "$file")
    log "giving $rootless_user the subordinate ids $start-$((start + 65535)) in $file"
    echo "$rootless_user:$start:65536" >>"$file"
  fi
done
runtime_dir=/run/user/$rootless_uid
mkdir -p "$runtime_dir"
chown "$rootless_uid:$rootless_gid" "$runtime_dir"
chmod 0700 "$runtime_dir"

# ------------------------------------------------------------------ report
hard_nofile=$(ulimit -Hn)
cap_bounding=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
if (((16#${cap_bounding:-0} >> 24 & 1) == 0)); then # bit 24: CAP_SYS_RESOURCE
  log "note: no CAP_SYS_RESOURCE here (hard nofile limit $hard_nofile): podman must run with the harness's" \
    "CONTAINERS_CONF=integration/containers/containers.conf (or --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)"
fi
log "ready: $(runc --version | head -1), $(crun --version | head -1), $(podman --version)"
