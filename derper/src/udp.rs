//! Batched UDP I/O for the STUN server and the benchmark's STUN client: one `recvmmsg(2)`
//! receives up to a batch of datagrams, one `sendmmsg(2)` sends a batch of replies, each to
//! its own address. On other systems the same API falls back to one syscall per datagram.
//!
//! Buffers are allocated once per [`RecvBatch`] / [`SendBatch`]; nothing allocates per
//! datagram. The raw `mmsghdr`/`iovec` arrays that point into those buffers are built on
//! the stack inside each call, so no raw pointer outlives a syscall and both types are
//! `Send` (the serve loop holds them across `.await`).
//!
//! Not here: parsing (see [`crate::stun`]) and readiness waits (the caller awaits
//! `readable()` / `writable()` and calls the `try_*` methods, which clear readiness on
//! `WouldBlock`).
#![warn(clippy::indexing_slicing)]

use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;

/// The most datagrams one `recvmmsg`/`sendmmsg` call handles (the stack arrays' size).
pub const MAX_BATCH: usize = 64;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The bytes received (at most the slot size).
    pub data: &'a [u8],
    /// The sender (`None` only if the kernel reported an address family we do not know).
    pub src: Option<SocketAddr>,
    /// The datagram was larger than the slot and `data` is only its start.
    pub truncated: bool,
}

/// Receive buffers for up to `slots` datagrams of up to `slot_len` bytes each.
#[derive(Debug)]
pub struct RecvBatch {
    buf: Vec<u8>,
    slot_len: usize,
    meta: Vec<Meta>,
    filled: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    len: usize,
    src: Option<SocketAddr>,
    truncated: bool,
}

impl RecvBatch {
    /// Buffers for `slots` (clamped to 1..=[`MAX_BATCH`]) datagrams of `slot_len` bytes.
    ///
    /// The buffer is zero-allocated in one piece, so pages no datagram reaches are never
    /// touched: 64 slots of 64 KiB reserve 4 MiB of address space but only the pages
    /// small datagrams land in count towards RSS.
    pub fn new(slots: usize, slot_len: usize) -> RecvBatch {
        let slots = slots.clamp(1, MAX_BATCH);
        let slot_len = slot_len.max(1);
        RecvBatch {
            buf: vec![0u8; slots * slot_len],
            slot_len,
            meta: vec![Meta::default(); slots],
            filled: 0,
        }
    }

    /// Receive as many queued datagrams as fit without blocking and return how many.
    /// `WouldBlock` if none was queued (readiness is then cleared, so `readable()` waits).
    pub fn try_recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.filled = 0;
        let n = sock.try_io(tokio::io::Interest::READABLE, || self.recv_now(sock))?;
        self.filled = n;
        Ok(n)
    }

    /// The `i`th datagram of the last [`try_recv`](Self::try_recv).
    pub fn get(&self, i: usize) -> Option<Datagram<'_>> {
        if i >= self.filled {
            return None;
        }
        let m = self.meta.get(i)?;
        let start = i * self.slot_len;
        let data = self.buf.get(start..start + m.len.min(self.slot_len))?;
        Some(Datagram {
            data,
            src: m.src,
            truncated: m.truncated,
        })
    }

    /// The datagrams of the last [`try_recv`](Self::try_recv), in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = Datagram<'_>> {
        (0..self.filled).filter_map(|i| self.get(i))
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn recv_now(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        let slots = self.meta.len();
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut addrs: [libc::sockaddr_storage; MAX_BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        for (i, chunk) in self
            .buf
            .chunks_exact_mut(self.slot_len)
            .take(slots)
            .enumerate()
        {
            let (Some(iov), Some(addr)) = (iovs.get_mut(i), addrs.get_mut(i)) else {
                break;
            };
            iov.iov_base = chunk.as_mut_ptr().cast();
            iov.iov_len = chunk.len();
            let addr_ptr: *mut libc::sockaddr_storage = addr;
            let iov_ptr: *mut libc::iovec = iov;
            if let Some(h) = hdrs.get_mut(i) {
                h.msg_hdr.msg_name = addr_ptr.cast();
                h.msg_hdr.msg_namelen = socklen_of::<libc::sockaddr_storage>();
                h.msg_hdr.msg_iov = iov_ptr;
                h.msg_hdr.msg_iovlen = 1;
            }
        }
        let vlen = libc::c_uint::try_from(slots).unwrap_or(1);
        // SAFETY: `hdrs[..slots]` each point at one live iovec covering a distinct
        // `slot_len` chunk of `self.buf` and at a live `sockaddr_storage` with its size in
        // `msg_namelen`; all of them outlive the call, and `vlen` <= MAX_BATCH. A null
        // timeout with MSG_DONTWAIT never blocks.
        let r = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let n = usize::try_from(r).map_err(|_| io::Error::last_os_error())?;
        for i in 0..n.min(slots) {
            let (Some(h), Some(addr), Some(m)) = (hdrs.get(i), addrs.get(i), self.meta.get_mut(i))
            else {
                break;
            };
            *m = Meta {
                len: usize::try_from(h.msg_len).unwrap_or(0),
                src: from_storage(addr),
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        Ok(n.min(slots))
    }

    #[cfg(not(target_os = "linux"))]
    fn recv_now(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let mut n = 0;
        for (chunk, m) in self
            .buf
            .chunks_exact_mut(self.slot_len)
            .zip(self.meta.iter_mut())
        {
            match sock.try_recv_from(chunk) {
                Ok((len, src)) => {
                    *m = Meta {
                        len,
                        src: Some(src),
                        truncated: false,
                    };
                    n += 1;
                }
                Err(e) if n > 0 && e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

/// Outgoing datagrams of up to `slot_len` bytes each, sent with as few syscalls as the
/// kernel allows.
#[derive(Debug)]
pub struct SendBatch {
    buf: Vec<u8>,
    slot_len: usize,
    msgs: Vec<Out>,
    /// Messages `[sent..msgs.len()]` are still pending.
    sent: usize,
}

#[derive(Debug, Clone, Copy)]
struct Out {
    len: usize,
    dst: Option<SocketAddr>,
}

impl SendBatch {
    /// Room for `slots` (clamped to 1..=[`MAX_BATCH`]) datagrams of `slot_len` bytes.
    pub fn new(slots: usize, slot_len: usize) -> SendBatch {
        let slots = slots.clamp(1, MAX_BATCH);
        let slot_len = slot_len.max(1);
        SendBatch {
            buf: vec![0u8; slots * slot_len],
            slot_len,
            msgs: Vec::with_capacity(slots),
            sent: 0,
        }
    }

    /// Queue one datagram: `fill` writes it into the slot it is given and returns its
    /// length. `dst = None` sends on a connected socket. Returns `false` (and queues
    /// nothing) when the batch is full.
    pub fn push(&mut self, dst: Option<SocketAddr>, fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let i = self.msgs.len();
        if i * self.slot_len >= self.buf.len() {
            return false;
        }
        let Some(slot) = self.buf.get_mut(i * self.slot_len..(i + 1) * self.slot_len) else {
            return false;
        };
        let len = fill(slot).min(self.slot_len);
        self.msgs.push(Out { len, dst });
        true
    }

    /// Datagrams queued and not yet sent (or skipped).
    pub fn pending(&self) -> usize {
        self.msgs.len() - self.sent
    }

    /// Drop the first pending datagram (after [`try_send`](Self::try_send) failed on it).
    pub fn skip_one(&mut self) {
        if self.sent < self.msgs.len() {
            self.sent += 1;
        }
        self.reset_if_done();
    }

    /// Drop everything pending.
    pub fn clear(&mut self) {
        self.msgs.clear();
        self.sent = 0;
    }

    fn reset_if_done(&mut self) {
        if self.sent >= self.msgs.len() {
            self.clear();
        }
    }

    /// Send as many pending datagrams as the kernel takes now; returns how many went out.
    /// An error (`WouldBlock` included) concerns the first pending datagram, which stays
    /// queued: wait for `writable()` and retry, or [`skip_one`](Self::skip_one).
    pub fn try_send(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        if self.pending() == 0 {
            return Ok(0);
        }
        let n = sock.try_io(tokio::io::Interest::WRITABLE, || self.send_now(sock))?;
        self.sent = (self.sent + n).min(self.msgs.len());
        self.reset_if_done();
        Ok(n)
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn send_now(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        let pending = self.msgs.get(self.sent..).unwrap_or_default();
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut addrs: [libc::sockaddr_storage; MAX_BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        let mut count = 0usize;
        for (k, out) in pending.iter().enumerate() {
            let i = self.sent + k;
            let (Some(iov), Some(addr), Some(h)) =
                (iovs.get_mut(k), addrs.get_mut(k), hdrs.get_mut(k))
            else {
                break;
            };
            let Some(slot) = self
                .buf
                .get_mut(i * self.slot_len..i * self.slot_len + out.len)
            else {
                break;
            };
            iov.iov_base = slot.as_mut_ptr().cast();
            iov.iov_len = slot.len();
            let iov_ptr: *mut libc::iovec = iov;
            h.msg_hdr.msg_iov = iov_ptr;
            h.msg_hdr.msg_iovlen = 1;
            if let Some(dst) = out.dst {
                let len = to_storage(dst, addr);
                let addr_ptr: *mut libc::sockaddr_storage = addr;
                h.msg_hdr.msg_name = addr_ptr.cast();
                h.msg_hdr.msg_namelen = len;
            }
            count += 1;
        }
        let vlen = libc::c_uint::try_from(count).unwrap_or(1);
        // SAFETY: `hdrs[..count]` each point at one live iovec covering `len` initialised
        // bytes of `self.buf`, and at a live, initialised `sockaddr_storage` whose used
        // length is in `msg_namelen` (or no address, for a connected socket); all outlive
        // the call. MSG_DONTWAIT never blocks.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    #[cfg(not(target_os = "linux"))]
    fn send_now(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let mut n = 0;
        for (k, out) in self
            .msgs
            .get(self.sent..)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let i = self.sent + k;
            let data = self
                .buf
                .get(i * self.slot_len..i * self.slot_len + out.len)
                .unwrap_or_default();
            let r = match out.dst {
                Some(dst) => sock.try_send_to(data, dst),
                None => sock.try_send(data),
            };
            match r {
                Ok(_) => n += 1,
                Err(e) if n > 0 && e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if n > 0 => {
                    let _ = e;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

#[cfg(target_os = "linux")]
fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(0)
}

/// The socket address in `s`, if it is IPv4 or IPv6.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which is smaller
            // than sockaddr_storage and has no stricter alignment.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Write `addr` into `s` and return the length the kernel should read.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn to_storage(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_in fits in sockaddr_storage with compatible alignment, and
            // every field written below is plain data.
            let a: &mut libc::sockaddr_in =
                unsafe { &mut *(s as *mut libc::sockaddr_storage).cast() };
            a.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2);
            a.sin_port = v4.port().to_be();
            a.sin_addr = libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            };
            socklen_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let a: &mut libc::sockaddr_in6 =
                unsafe { &mut *(s as *mut libc::sockaddr_storage).cast() };
            a.sin6_family = libc::sa_family_t::try_from(libc::AF_INET6).unwrap_or(10);
            a.sin6_port = v6.port().to_be();
            a.sin6_flowinfo = v6.flowinfo();
            a.sin6_addr = libc::in6_addr {
                s6_addr: v6.ip().octets(),
            };
            a.sin6_scope_id = v6.scope_id();
            socklen_of::<libc::sockaddr_in6>()
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    async fn pair(bind: &str) -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind(bind).await.expect("bind a");
        let b = UdpSocket::bind(bind).await.expect("bind b");
        (a, b)
    }

    #[tokio::test]
    async fn batch_round_trip_v4_and_v6_with_truncation() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let (srv, cli) = pair(bind).await;
            let srv_addr = srv.local_addr().expect("addr");
            let cli_addr = cli.local_addr().expect("addr");
            // Three datagrams, one longer than the receive slot.
            let mut out = SendBatch::new(8, 64);
            for (i, len) in [5usize, 64, 40].into_iter().enumerate() {
                assert!(out.push(Some(srv_addr), |slot| {
                    slot.iter_mut()
                        .take(len)
                        .for_each(|b| *b = u8::try_from(i).unwrap_or(0));
                    len
                }));
            }
            assert_eq!(out.pending(), 3);
            let mut sent = 0;
            while out.pending() > 0 {
                cli.writable().await.expect("writable");
                sent += out.try_send(&cli).unwrap_or(0);
            }
            assert_eq!(sent, 3);
            let mut rx = RecvBatch::new(8, 32);
            let mut got = Vec::new();
            while got.len() < 3 {
                srv.readable().await.expect("readable");
                match rx.try_recv(&srv) {
                    Ok(_) => got.extend(rx.iter().map(|d| (d.data.to_vec(), d.src, d.truncated))),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("recv: {e}"),
                }
            }
            assert_eq!(got[0], (vec![0u8; 5], Some(cli_addr), false));
            assert_eq!(got[1], (vec![1u8; 32], Some(cli_addr), true), "{bind}");
            assert_eq!(got[2], (vec![2u8; 32], Some(cli_addr), true));
            assert!(rx.get(3).is_none());
        }
    }

    #[tokio::test]
    async fn connected_send_and_full_batch() {
        let (srv, cli) = pair("127.0.0.1:0").await;
        cli.connect(srv.local_addr().expect("addr"))
            .await
            .expect("connect");
        let mut out = SendBatch::new(2, 16);
        assert!(out.push(None, |s| {
            s[..3].copy_from_slice(b"abc");
            3
        }));
        assert!(out.push(None, |_| 0));
        assert!(!out.push(None, |_| 1), "third push into a 2-slot batch");
        cli.writable().await.expect("writable");
        assert_eq!(out.try_send(&cli).expect("send"), 2);
        assert_eq!(out.pending(), 0);
        let mut rx = RecvBatch::new(4, 16);
        let mut seen = Vec::new();
        while seen.len() < 2 {
            srv.readable().await.expect("readable");
            if rx.try_recv(&srv).is_ok() {
                seen.extend(rx.iter().map(|d| d.data.to_vec()));
            }
        }
        assert_eq!(seen, vec![b"abc".to_vec(), Vec::new()]);
    }

    #[tokio::test]
    async fn empty_socket_would_block() {
        let (srv, _cli) = pair("127.0.0.1:0").await;
        let mut rx = RecvBatch::new(4, 16);
        let e = rx.try_recv(&srv).expect_err("nothing queued");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(rx.iter().count(), 0);
    }

    #[tokio::test]
    async fn send_error_is_reported_for_the_first_pending_datagram() {
        let (_srv, cli) = pair("127.0.0.1:0").await;
        let mut out = SendBatch::new(4, 8);
        // An IPv6 destination on an IPv4 socket fails at once (EAFNOSUPPORT / EINVAL).
        assert!(out.push(Some("[::1]:9".parse().expect("addr")), |_| 1));
        assert!(out.push(Some(cli.local_addr().expect("addr")), |_| 1));
        cli.writable().await.expect("writable");
        let e = out.try_send(&cli).expect_err("bad family");
        assert_ne!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(out.pending(), 2);
        out.skip_one();
        assert_eq!(out.try_send(&cli).expect("second goes"), 1);
        assert_eq!(out.pending(), 0);
    }
}
