//! `heapcap`: per-process heap quotas, enforced from user space with seccomp user notification.
#![forbid(unsafe_code)]

mod control;
mod demo;
mod keeper;
mod report;
mod run;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use heapcap_policy::{MachineMemory, Quota, Size};

/// Exit status for a command line heapcap cannot use.
const USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "heapcap",
    version,
    about = "Per-process heap quotas: memory growth past the quota fails with ENOMEM instead of taking the machine down.",
    long_about = None,
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command with a heap quota for each of its processes.
    ///
    /// The quota counts each process's private, anonymous, writable memory: the brk heap,
    /// anonymous mmap, memory made writable with mprotect, mremap growth. File mappings,
    /// shared memory and the main thread's stack are not counted. A growth past the quota
    /// fails with ENOMEM (malloc returns NULL, Python raises MemoryError).
    ///
    /// Examples:
    ///   heapcap run --limit 64Mi -- python3 -c 'x = bytearray(200 * 2**20)'
    ///   heapcap run --limit 1Gi --total-limit 3Gi -- make -j4
    ///   heapcap run --audit -- make -j2      # observe only; print each process's peak heap
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// List every container under heapcapd and its processes: heap now, peak, limit, denials.
    Ps {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Change a container's quota live; it applies to the next growth.
    ///
    /// Lowering a quota below what a process holds denies its further growth; it never takes
    /// memory away. Write `none` to remove a quota.
    ///
    /// Examples:
    ///   heapcap set-limit web-1 256Mi              # each process of container web-1
    ///   heapcap set-limit web-1 --pid 4242 1Gi     # one process
    ///   heapcap set-limit web-1 --total 2Gi        # all processes of web-1 together
    #[command(verbatim_doc_comment)]
    SetLimit {
        /// Container id (or a unique prefix of it), as `heapcap ps` shows.
        container: String,
        /// New quota for each process (or for the process given with --pid).
        #[arg(value_name = "SIZE")]
        limit: Option<Quota>,
        /// Apply the quota to this process only.
        #[arg(long)]
        pid: Option<u32>,
        /// New quota for all the container's processes together.
        #[arg(long, value_name = "SIZE")]
        total: Option<Quota>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show denials: time, container, pid, command, syscall, requested, usage, limit.
    Events {
        /// Keep running and print denials as they happen.
        #[arg(long, short)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show what a quota does: a leaking program without and with `--limit 64Mi`.
    Demo,
    /// A program that leaks memory until an allocation fails (used by the demo).
    #[command(hide = true)]
    Leak {
        /// Stop by itself after this much.
        #[arg(long, value_name = "SIZE", value_parser = parse_limit, default_value = "1Gi")]
        max: Size,
    },
    /// `heapcap run`'s keeper: holds a copy of its listener, takes over if it is killed.
    #[command(hide = true)]
    Keep,
}

/// heapcapd's control socket.
#[derive(Debug, Args)]
struct SocketArg {
    /// heapcapd's control socket (default: root's heapcapd as root, else your own, in
    /// `$XDG_RUNTIME_DIR/heapcap`).
    #[arg(long = "control-socket", value_name = "PATH", env = "HEAPCAP_CONTROL_SOCKET", default_value_os_t = default_control_socket())]
    path: std::path::PathBuf,
}

/// The control socket of the heapcapd of the user heapcap runs as.
fn default_control_socket() -> std::path::PathBuf {
    let xdg = std::env::var_os("XDG_RUNTIME_DIR");
    heapcap_env::paths::Paths::for_user(heapcap_linux::userns::host_euid(), xdg.as_deref()).control
}

fn parse_limit(s: &str) -> Result<Size, String> {
    Size::parse_limit(s).map_err(|e| e.to_string())
}

fn parse_machine(s: &str) -> Result<MachineMemory, String> {
    s.parse().map_err(|e: heapcap_policy::machine::MachineMemoryError| e.to_string())
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Heap quota for each process: 64Mi, 1.5Gi, 500M, 1048576 (bytes).
    #[arg(long, value_name = "SIZE", value_parser = parse_limit)]
    limit: Option<Size>,
    /// Heap quota for all the command's processes together.
    #[arg(long, value_name = "SIZE", value_parser = parse_limit)]
    total_limit: Option<Size>,
    /// Observe only: never deny; report each process's peak heap at exit.
    #[arg(long)]
    audit: bool,
    /// Count what no program can step around: every writable private mapping (as RLIMIT_DATA)
    /// and every writable shared mapping of memory (memfd, SysV shm, tmpfs, MAP_SHARED
    /// anonymous), charged to each process that maps it.
    #[arg(long)]
    strict: bool,
    /// What the command is told its machine's memory is: `quota` (the default: under --limit or
    /// --total-limit, sysinfo(2), and so sysconf(_SC_PHYS_PAGES), the JVM's default heap and
    /// `free`, report the quota as the machine's memory) or `host` (the host's figures).
    #[arg(long, value_name = "quota|host", default_value_t = MachineMemory::Quota, value_parser = parse_machine)]
    machine_memory: MachineMemory,
    /// Print a table of each process's peak heap and denials on stderr at exit.
    #[arg(long)]
    report: bool,
    /// Do not print a line for each denied allocation.
    #[arg(long, short)]
    quiet: bool,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// One line: clap's message without its trailing tips, plus where to look.
fn usage_line(err: &clap::Error) -> String {
    // clap reads `set-limit web-1 -5Mi` as the flags -5, -M, -i: say what is wrong with the size.
    if err.kind() == clap::error::ErrorKind::UnknownArgument {
        let negative = std::env::args().find(|a| a.len() > 1 && a.starts_with('-') && a.as_bytes()[1].is_ascii_digit());
        if let Some(n) = negative {
            return format!("heapcap: '{n}' is negative: write a positive size such as 64Mi (see heapcap --help)");
        }
    }
    let rendered = err.render().to_string();
    let mut parts = rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:"));
    let first = parts.next().unwrap_or("invalid command line").trim_start_matches("error: ");
    let rest: Vec<&str> = parts.collect();
    let mut line = format!("heapcap: {first}");
    if !rest.is_empty() {
        line.push(' ');
        line.push_str(&rest.join(" "));
    }
    if err.kind() == clap::error::ErrorKind::MissingRequiredArgument {
        line.push_str(" (write: heapcap run --limit 64Mi -- COMMAND [ARGS...])");
    } else {
        line.push_str(" (see heapcap --help)");
    }
    line
}

/// `heapcap run --limit 64Mi --mode audit -- cmd` takes `--mode` as the command (everything from
/// the first unknown word on is the command): an option-like first word not written after `--`.
fn option_taken_for_command(command: &[OsString]) -> Option<String> {
    let first = command.first()?.to_str()?;
    let after_dashes = std::env::args().collect::<Vec<_>>().windows(2).any(|w| w[0] == "--" && w[1] == first);
    (first.starts_with('-') && !after_dashes).then(|| first.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion
                    | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            let _ = e.print();
            return if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
        Err(e) => {
            eprintln!("{}", usage_line(&e));
            return ExitCode::from(USAGE);
        }
    };
    init_logging();
    match cli.command {
        Command::Run(args) => match option_taken_for_command(&args.command) {
            Some(option) => {
                eprintln!(
                    "heapcap: unknown option '{option}' for run: its options are --limit, --total-limit, --audit, \
                     --strict, --machine-memory, --report, --quiet (see heapcap run --help); a command goes after --"
                );
                ExitCode::from(USAGE)
            }
            None => run::main(args),
        },
        Command::Ps { json, socket } => control::ps(&socket.path, json),
        Command::SetLimit { container, limit, pid, total, socket } => {
            if limit.is_none() && total.is_none() {
                eprintln!(
                    "heapcap: set-limit needs a SIZE, --total SIZE, or both (e.g. heapcap set-limit {container} 256Mi)"
                );
                return ExitCode::from(USAGE);
            }
            control::set_limit(&socket.path, container, pid, limit, total)
        }
        Command::Events { follow, json, socket } => control::events(&socket.path, follow, json),
        Command::Demo => demo::demo(),
        Command::Leak { max } => demo::leak(max),
        Command::Keep => keeper::main(),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEAPCAP_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
}
