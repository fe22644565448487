//! Compiles `fixtures/alloc.c` three times, natively, with `-m32`, and
//! natively with `-static`, and tells the tests where the binaries are
//! (`HEAPCAP_ALLOC`, `HEAPCAP_ALLOC32`, `HEAPCAP_ALLOC_STATIC`); and
//! `fixtures/strict.c` four times (native, `-m32`, each also `-static`).
//!
//! The static build is what the container tests copy into their busybox-only
//! root filesystems (`/alloc`), where there is no dynamic loader or libc.
//!
//! All builds are required: a missing `gcc`, missing 32-bit support
//! (`gcc-multilib`) or a missing static C library (`libc6-dev`'s `libc.a`)
//! fails the build instead of silently dropping tests.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "fixtures/alloc.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");

    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = manifest_dir.join(SOURCE);

    let alloc = out_dir.join("alloc");
    compile(&source, &alloc, &[], "install gcc (Debian/Ubuntu: apt-get install gcc)");
    let alloc32 = out_dir.join("alloc32");
    compile(
        &source,
        &alloc32,
        &["-m32"],
        "install 32-bit support for gcc (Debian/Ubuntu: apt-get install gcc-multilib)",
    );

    let alloc_static = out_dir.join("alloc-static");
    compile(
        &source,
        &alloc_static,
        &["-static"],
        "install the static C library for gcc -static (Debian/Ubuntu: apt-get install libc6-dev, \
         which ships libc.a; Fedora: dnf install glibc-static)",
    );

    println!("cargo:rustc-env=HEAPCAP_ALLOC={}", alloc.display());
    println!("cargo:rustc-env=HEAPCAP_ALLOC32={}", alloc32.display());
    println!("cargo:rustc-env=HEAPCAP_ALLOC_STATIC={}", alloc_static.display());

    // The ways around a quota (strict mode): native and i386 for `heapcap run`, static (64-bit and
    // i386) for containers' busybox root filesystems. HEAPCAP_STRICT_FIXTURE{,32,_STATIC,32_STATIC}.
    let source = manifest_dir.join("fixtures/strict.c");
    println!("cargo:rerun-if-changed={}", source.display());
    for (suffix, var, flags) in [
        ("", "HEAPCAP_STRICT_FIXTURE", &[][..]),
        ("32", "HEAPCAP_STRICT_FIXTURE32", &["-m32"][..]),
        ("-static", "HEAPCAP_STRICT_FIXTURE_STATIC", &["-static"][..]),
        ("32-static", "HEAPCAP_STRICT_FIXTURE32_STATIC", &["-m32", "-static"][..]),
    ] {
        let output = out_dir.join(format!("strict{suffix}"));
        compile(
            &source,
            &output,
            flags,
            "install gcc, gcc-multilib and libc6-dev (apt-get install gcc gcc-multilib libc6-dev)",
        );
        println!("cargo:rustc-env={var}={}", output.display());
    }

    // The isolation, signal and sysinfo probes, static: the same binary runs on the host and in
    // containers (HEAPCAP_ISOLATION_STATIC, HEAPCAP_SIGNALS_STATIC, HEAPCAP_SYSINFO_STATIC).
    for (name, var) in [
        ("isolation", "HEAPCAP_ISOLATION_STATIC"),
        ("signals", "HEAPCAP_SIGNALS_STATIC"),
        ("sysinfo", "HEAPCAP_SYSINFO_STATIC"),
    ] {
        let source = manifest_dir.join(format!("fixtures/{name}.c"));
        println!("cargo:rerun-if-changed={}", source.display());
        let output = out_dir.join(format!("{name}-static"));
        compile(&source, &output, &["-static"], "install the static C library (apt-get install libc6-dev)");
        println!("cargo:rustc-env={var}={}", output.display());
    }
}

/// Runs `gcc [extra] -O1 -pthread -o output source`; panics with gcc's own
/// diagnostics and `hint` if gcc is missing or the compilation fails.
fn compile(source: &Path, output: &Path, extra: &[&str], hint: &str) {
    let mut cmd = Command::new("gcc");
    cmd.args(extra).args(["-O1", "-pthread", "-Wall", "-Wextra", "-o"]).arg(output).arg(source);
    let shown = format!("{cmd:?}");
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => {
            panic!("heapcap-integration needs gcc to build its test fixture, but running `{shown}` failed: {e}; {hint}")
        }
    };
    let diagnostics = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!(
            "heapcap-integration: compiling the test fixture failed ({}): `{shown}`\n{diagnostics}\n{hint}",
            out.status
        );
    }
    for line in diagnostics.lines() {
        println!("cargo:warning={line}");
    }
}
