//! `heapcap demo`: a leaking program, once on its own and once under a quota.
//!
//! The leak is heapcap itself (`heapcap leak`), so the demo needs nothing but the binary.

use std::process::{Command, ExitCode};

use heapcap_policy::Size;

const CHUNK: usize = 8 << 20;

/// Allocate and touch `CHUNK`s until an allocation fails or `max` is reached, then report.
pub fn leak(max: Size) -> ExitCode {
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut total = 0u64;
    while total + CHUNK as u64 <= max.bytes() {
        let mut chunk = Vec::new();
        if chunk.try_reserve_exact(CHUNK).is_err() {
            println!("leak: allocation failed after {} (malloc returned NULL): cleaning up and exiting", Size(total));
            return ExitCode::SUCCESS;
        }
        chunk.resize(CHUNK, 1);
        held.push(chunk);
        total += CHUNK as u64;
    }
    println!("leak: reached {} and nothing stopped it", Size(total));
    ExitCode::SUCCESS
}

fn step(title: &str, cmd: &mut Command) -> std::io::Result<()> {
    println!("\n$ {title}");
    let status = cmd.status()?;
    println!("  -> exit status {}", status.code().map_or_else(|| format!("{status}"), |c| c.to_string()));
    Ok(())
}

pub fn demo() -> ExitCode {
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("heapcap: cannot find my own binary: {e}");
            return ExitCode::from(125);
        }
    };
    println!("heapcap demo: a program that leaks memory in 8 MiB steps (it gives up by itself at 1 GiB).");
    let result = step("heapcap leak --max 1Gi            # no quota", Command::new(&me).args(["leak", "--max", "1Gi"]))
        .and_then(|()| {
            step(
                "heapcap run --limit 64Mi --report -- heapcap leak --max 1Gi",
                Command::new(&me)
                    .args(["run", "--limit", "64Mi", "--report", "--"])
                    .arg(&me)
                    .args(["leak", "--max", "1Gi"]),
            )
        });
    match result {
        Ok(()) => {
            println!(
                "\nUnder the quota the leak got ENOMEM near 64 MiB and could handle it; the machine never paid for it."
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("heapcap: demo failed: {e}");
            ExitCode::from(125)
        }
    }
}
