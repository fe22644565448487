//! Passing fds over UNIX sockets (`SCM_RIGHTS`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const MAX_FDS: usize = 8;

/// Room for `MAX_FDS` ints of control data, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

const _: () = assert!(std::mem::size_of::<libc::cmsghdr>() + MAX_FDS * 4 <= 64);

/// Send `data` with one fd. Async-signal-safe (no allocation): usable between fork and exec.
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    send_fds(sock, &[fd], data)
}

/// Send `data` with up to 8 fds (none is fine). Async-signal-safe (no allocation).
pub fn send_fds(sock: BorrowedFd<'_>, fds: &[BorrowedFd<'_>], data: &[u8]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds for one message"));
    }
    let mut cmsg_buf = CmsgBuf([0; 64]);
    let mut iov = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
    // SAFETY: msghdr is plain data; all-zero is valid, and the fields are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = (fds.len() * std::mem::size_of::<RawFd>()) as u32;
        msg.msg_control = cmsg_buf.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as usize;
        // SAFETY: msg_control points at a buffer of at least msg_controllen bytes (checked by
        // the const assertion on CmsgBuf for MAX_FDS fds), aligned for cmsghdr, so CMSG_FIRSTHDR
        // returns a valid, non-null header inside it, and CMSG_DATA points at room for
        // fds.len() RawFds within that buffer.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>().add(i), fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg and everything it points to live until sendmsg returns.
    let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if rc < 0 {
        Err(crate::last_error())
    } else {
        Ok(())
    }
}

/// Accept a connection on a listening socket of any type (std only knows stream sockets),
/// close-on-exec.
pub fn accept(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: plain accept4 on a valid fd, without address buffers.
    let fd = unsafe { libc::accept4(sock.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if fd < 0 {
        return Err(crate::last_error());
    }
    // SAFETY: accept4 just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One message received: its bytes and every fd that came with it (close-on-exec).
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The control data was cut short (more fds than we take): the extra ones are lost.
    pub truncated: bool,
}

/// Receive one message into `buf`, with any fds.
pub fn recv_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg_buf = CmsgBuf([0; 64]);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; all-zero is valid, and the fields are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_buf.0.len();
    // SAFETY: msg points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(crate::last_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed cmsgs;
    // CMSG_FIRSTHDR/NXTHDR stay inside it and each SCM_RIGHTS payload is an array of ints.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let payload = (*cmsg).cmsg_len - (data as usize - cmsg as usize);
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // The kernel installed this fd for us: we own it now.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received { len: n as usize, fds, truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_fd_crosses_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut r, mut w) = UnixStream::pair().unwrap();
        send_fd(a.as_fd(), w.as_fd(), b"hello").unwrap();
        let mut buf = [0u8; 16];
        let got = recv_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        assert_eq!(got.fds.len(), 1);
        let mut passed = std::fs::File::from(got.fds.into_iter().next().unwrap());
        passed.write_all(b"x").unwrap();
        drop(passed);
        w.flush().unwrap();
        let mut one = [0u8; 1];
        r.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
    }
}
