//! `sysinfo(2)` of the calling process: the kernel's figures, which heapcap hands on to a process
//! under a quota with its memory totals replaced ([`heapcap_policy::machine`]).

use heapcap_policy::machine::SysInfo;

/// The kernel's `sysinfo(2)`, as heapcap sees it.
pub fn host() -> std::io::Result<SysInfo> {
    // SAFETY: `libc::sysinfo` is plain data, so all-zero is a valid value.
    let mut raw: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `raw` is a valid, writable `struct sysinfo` for the duration of the call.
    if unsafe { libc::sysinfo(&mut raw) } != 0 {
        return Err(crate::last_error());
    }
    Ok(SysInfo {
        uptime: raw.uptime,
        loads: raw.loads,
        totalram: raw.totalram,
        freeram: raw.freeram,
        sharedram: raw.sharedram,
        bufferram: raw.bufferram,
        totalswap: raw.totalswap,
        freeswap: raw.freeswap,
        procs: raw.procs,
        totalhigh: raw.totalhigh,
        freehigh: raw.freehigh,
        mem_unit: raw.mem_unit,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_machine() {
        let s = super::host().expect("sysinfo");
        assert!(s.totalram > 0 && s.freeram <= s.totalram && s.mem_unit >= 1, "{s:?}");
        assert!(s.procs > 0);
    }
}
