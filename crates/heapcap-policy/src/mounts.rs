//! `/proc/<pid>/mountinfo`, reduced to one question: which devices are mounts the kernel writes
//! back to a disk (so a shared mapping of a file there is page cache, not memory only RAM and
//! swap back)?
//!
//! A line is `id parent major:minor root mountpoint options [optional...] - fstype source
//! superoptions`. The device is the superblock's, as `/proc/<pid>/maps` shows a file mapping's.
//! Every file system type is taken as disk-backed but those in [`RAM_BACKED`]; a device that is
//! no mount at all (the kernel's internal shmem mount behind memfd, SysV shm and shared
//! anonymous memory, or a mount since unmounted) is never disk-backed.

use crate::maps::dev;

/// File systems whose files live in RAM (and swap): a shared writable mapping of one of their
/// files counts in strict mode. overlayfs is here because its upper layer may be tmpfs (a
/// container's writable layer on a tmpfs, or an overlay a process mounted itself in a user
/// namespace): counting it is the side that cannot be stepped around.
pub const RAM_BACKED: &[&str] = &["tmpfs", "ramfs", "hugetlbfs", "devtmpfs", "shm", "overlay"];

/// The devices of the disk-backed mounts in a `mountinfo` text, sorted. Lines that cannot be
/// read are skipped: a device missing here counts as memory, the safe side.
pub fn disk_devices(mountinfo: &str) -> Vec<u64> {
    let mut devs: Vec<u64> = mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?;
            let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
            if RAM_BACKED.contains(&fstype) {
                return None;
            }
            let (major, minor) = device.split_once(':')?;
            Some(dev(major.parse().ok()?, minor.parse().ok()?))
        })
        .collect();
    devs.sort_unstable();
    devs.dedup();
    devs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{Counting, Maps};

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
24 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4k
25 24 0:26 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw
26 22 0:27 / /data rw,relatime shared:9 master:3 - xfs /dev/vdb rw
27 22 0:48 / /srv rw,relatime - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
28 22 0:49 / /odd rw,relatime - fuse.sshfs host:/x rw
";

    #[test]
    fn only_ram_backed_types_are_left_out() {
        let devs = disk_devices(MOUNTINFO);
        assert_eq!(devs, vec![dev(0, 21), dev(0, 27), dev(0, 49), dev(254, 0)]);
        assert!(disk_devices("garbage\n1 2 x:y / / rw - ext4 a b\n").is_empty());
    }

    #[test]
    fn strict_counts_shared_memory_and_private_writable_mappings() {
        let maps = "\
1000-2000 rw-p 00000000 fe:00 10 /usr/lib/libc.so.6
2000-3000 rw-s 00000000 00:01 7 /memfd:x (deleted)
3000-5000 rw-s 00000000 00:01 32769 /SYSV00000000 (deleted)
5000-6000 rw-s 00000000 00:01 8 /dev/zero (deleted)
6000-7000 rw-s 00000000 00:1a 9 /dev/shm/seg
7000-8000 rw-s 00000000 fe:00 11 /var/db/file
8000-9000 rw-p 00000000 00:05 4 /dev/zero
9000-a000 r--s 00000000 00:01 12 /memfd:ro (deleted)
a000-b000 rw-p 00000000 00:00 0 [stack]
b000-c000 rw-p 00000000 00:00 0
c000-d000 r--p 00000000 fe:00 10 /usr/lib/libc.so.6
";
        let mut m = Maps::parse(maps).unwrap();
        let tmpfs_and_disk = "1 1 0:26 / /dev/shm rw - tmpfs tmpfs rw\n2 1 254:0 / / rw - ext4 /dev/vda1 rw\n";
        let disks = disk_devices(tmpfs_and_disk);
        m.classify(|d| disks.binary_search(&d).is_ok());
        assert_eq!(m.counted(), 0x1000, "heap: only the anonymous private page");
        // libc data, memfd, SysV, shared anon, /dev/shm file, private /dev/zero, anonymous;
        // not the disk file shared, the read-only memfd, the stack.
        assert_eq!(m.counted_as(Counting::Strict), 0x1000 * 8);
        assert_eq!(m.protect_growth_as(Counting::Strict, 0x9000, 0xd000), 0x2000, "read-only memfd and libc text");
        assert_eq!(m.protect_growth(0x9000, 0xd000), 0);
    }
}
