//! `heapcap-holder`: keeps heapcapd's listener fds (and its journal) alive while heapcapd
//! restarts. heapcapd starts it (and starts a new one at once if it dies); it exits by itself
//! when it holds nothing and no heapcapd is connected, unless run with `--stay` by a service
//! manager. See the crate docs of `heapcap_holder`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::SigSet;

/// Holds heapcapd's seccomp listener fds across heapcapd crashes and upgrades.
#[derive(Debug, Parser)]
#[command(name = "heapcap-holder", version)]
struct Args {
    /// Where heapcapd connects (only root and the holder's own user). Default: `/run/heapcap/holder.sock`
    /// as root, else `$XDG_RUNTIME_DIR/heapcap/holder.sock`.
    #[arg(long, value_name = "PATH", default_value_os_t = default_socket())]
    socket: PathBuf,
    /// How long containers' heap growth waits for heapcapd to come back before it is let through
    /// unquota'd (until heapcapd returns).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// How many listeners (containers plus `exec`s) it can hold.
    #[arg(long, value_name = "N", default_value_t = 65536)]
    slots: usize,
    /// Never exit by itself, even holding nothing: for a holder run by a service manager (its own
    /// systemd unit, its own container in heapcapd's pod), which would only start it again.
    #[arg(long)]
    stay: bool,
}

/// The holder's socket unless given, for the user it runs as (heapcapd passes its own).
fn default_socket() -> PathBuf {
    let xdg = std::env::var_os("XDG_RUNTIME_DIR");
    heapcap_env::paths::Paths::for_user(heapcap_linux::userns::host_euid(), xdg.as_deref()).holder
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Started by heapcapd, which blocks SIGTERM/SIGINT for itself: signals end us normally.
    let _ = SigSet::all().thread_unblock();
    let config = heapcap_holder::holder::Config {
        socket: args.socket,
        grace: args.grace,
        slots: args.slots.max(1),
        first_contact: Duration::from_secs(30),
        stay: args.stay,
    };
    match heapcap_holder::holder::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("heapcap-holder: {e}");
            ExitCode::FAILURE
        }
    }
}
