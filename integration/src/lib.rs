//! heapcap's end-to-end test harness: real runc, crun and podman containers running a
//! busybox-only root filesystem that also holds the static build of the allocation fixture
//! (`fixtures/alloc.c`) as `/alloc`, and a real heapcapd. No mocks: every helper runs the real
//! binary. The test files in `integration/tests/` use it as
//!
//! ```text
//! use heapcap_integration::bundle::Bundle;
//! use heapcap_integration::ids::unique_id;
//! use heapcap_integration::runtime::Runtime;
//! ```
//!
//! # What it offers
//!
//! - [`ids::unique_id`]: container ids and names unique per host and test run
//!   (`hc-<pid>-<counter>-<tag>`).
//! - [`runtime::Runtime`] (`Runc`, `Crun`): the binary, and
//!   [`Runtime::ensure_works`](runtime::Runtime::ensure_works), which runs one trivial container
//!   per runtime and test process and panics with what to install or fix when that fails.
//!   [`Bundle::run`](bundle::Bundle::run) and [`Bundle::create`](bundle::Bundle::create) call it,
//!   so a broken host fails loudly and never skips a test.
//! - [`bundle::Bundle`]: an OCI bundle in a fresh temporary directory. Its `config.json` comes
//!   from `runc spec` (the runtime's own defaults: new pid/ipc/uts/mount/network namespaces,
//!   read-only root, no seccomp) with `process.terminal` turned off; setters change
//!   `process.args`, the environment, `root.readonly`, annotations, `linux.seccomp` (any JSON
//!   profile, e.g. heapcap's), hooks and read-only bind mounts, and
//!   [`Bundle::config_mut`](bundle::Bundle::config_mut) anything else.
//!   [`Bundle::run`](bundle::Bundle::run) runs it in the foreground and captures its output;
//!   [`Bundle::create`](bundle::Bundle::create) returns a [`container::Container`] guard for
//!   `start`, `exec`, `kill`, `state`, which deletes the container (`delete -f`) when dropped.
//! - [`podman`]: [`podman::image`] imports the same root filesystem once (per content, shared
//!   between test processes under a file lock) as `localhost/heapcap-test:<hash>`;
//!   [`podman::run`] / [`podman::run_full`] run it with `--rm --network none` and the test-local
//!   `containers.conf` (`integration/containers/containers.conf`, which sets the ulimits this
//!   host needs); [`podman::run_detached_and_exec`] runs a command with `podman exec`;
//!   [`podman::move_pages`] probes whether podman's own seccomp rules still hold;
//!   [`podman::command`] is `podman` with that configuration.
//! - [`process::run_captured`]: any other command with a timeout and captured output;
//!   [`process::show`], [`process::stdout`] and [`process::stderr`] for assertion messages.
//! - [`fixture`]: where the fixture is, parsers for its `allocated=N result=R` lines and
//!   `key=value` fields, and the bound a loop stopped at a quota must meet
//!   ([`fixture::assert_at_quota`]).
//! - [`binaries`]: heapcap's own binaries, built once per test process, and
//!   [`binaries::prestart_hook`], a `config.json` hook entry for `heapcap-hook`.
//! - [`daemon::Daemon`]: a real heapcapd on private sockets, stopped on drop, with `heapcap`,
//!   `ps`, `/metrics`, its seccomp profile ([`daemon::seccomp_profile`]) and a bundle that
//!   reports to it; [`daemon::Wedged`]: a listener that accepts nothing;
//!   [`daemon::settled`] and [`daemon::wait_back_to`]: a process's fds and threads, and waiting
//!   for them to come back to a baseline.
//!
//! - [`rootless`]: rootless podman as a real non-root user ([`rootless::USER`]): commands run as
//!   that user, the test image in its own storage, and its own heapcapd started with no flags.
//!
//! Every command has a timeout ([`process::TIMEOUT`] unless given): on expiry the container is
//! deleted, the command killed, and the test panics with what it printed.
//!
//! # Host programs inside a container
//!
//! The root filesystem has only busybox (`/bin`, with every applet) and `/alloc`. For a richer
//! program, bind the host's system directories read-only over it with
//! [`Bundle::with_host_system`](bundle::Bundle::with_host_system) (podman:
//! [`podman::host_system_volumes`]): `/usr` and the `/lib*`
//! directories, each mounted at its own name from its real location (so `/lib64` works on
//! merged-/usr hosts, where it is a symlink). Then
//!
//! ```text
//! let mut bundle = Bundle::new("python");
//! bundle.with_host_system().args(&["/usr/bin/python3", "-c", "print(1)"]);
//! let out = bundle.run(Runtime::Runc, &unique_id("python"));
//! ```
//!
//! `PATH` (from `runc spec`) lists `/usr/bin` before `/bin`, so with the host system mounted a
//! bare `sh` is the host's shell; use `/bin/sh` for busybox.
//!
//! # Host requirements
//!
//! Root, runc, crun, podman, busybox-static, and this host's cgroup and ulimit fixes:
//! `scripts/setup-runtimes.sh` sets all of that up (see its comments). Set `HEAPCAP_TEST_KEEP=1`
//! to keep bundle directories for inspection.

pub mod binaries;
pub mod bundle;
pub mod container;
pub mod daemon;
pub mod fixture;
pub mod ids;
pub mod podman;
pub mod process;
pub mod rootfs;
pub mod rootless;
pub mod runtime;
