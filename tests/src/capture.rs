//! Capturing frames off a veth and sending them again, byte for byte, with
//! an AF_PACKET socket: a replay exactly as an eavesdropper would do it.
//!
//! The capture is taken where the frames leave the client. On the server
//! side the XDP program drops knocks before any packet tap sees them, and
//! the bytes on the wire are the same on both ends of a veth.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use crate::NetNs;

/// An AF_PACKET socket bound to one interface in one namespace.
pub struct Capture {
    fd: OwnedFd,
    ifindex: i32,
}

fn check(rc: libc::c_int, what: &str) {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

fn sockaddr(ifindex: i32) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = ifindex;
    addr
}

impl Capture {
    /// Starts capturing every frame on `ifname` inside `ns`.
    pub fn start(ns: &NetNs, ifname: &str) -> Capture {
        let ifname = CString::new(ifname).unwrap();
        ns.run(move || {
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                )
            };
            check(raw, "socket(AF_PACKET)");
            // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) } as i32;
            assert!(ifindex > 0, "no interface {ifname:?}");
            let addr = sockaddr(ifindex);
            // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            check(rc, "bind(AF_PACKET)");
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: a valid timeval of the size passed.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const timeout).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            check(rc, "SO_RCVTIMEO");
            Capture { fd, ifindex }
        })
    }

    /// Frames this host sent out of the interface so far (until the socket
    /// is quiet for 200 ms) that satisfy `keep`.
    pub fn outgoing(&self, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        self.frames(true, keep)
    }

    /// Frames that arrived on the interface so far (until the socket is
    /// quiet for 200 ms) that satisfy `keep`: the answers a probe got.
    pub fn incoming(&self, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        self.frames(false, keep)
    }

    fn frames(&self, outgoing: bool, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: sockaddr_ll is plain data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: valid buffer and address pointers with their sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                break;
            }
            let frame = &buf[..n as usize];
            if (from.sll_pkttype == libc::PACKET_OUTGOING) == outgoing && keep(frame) {
                frames.push(frame.to_vec());
            }
        }
        frames
    }

    /// Sends each frame out of the interface again, unchanged.
    pub fn replay(&self, frames: &[Vec<u8>]) {
        self.send(frames, Duration::from_millis(2));
    }

    /// Sends each frame out of the interface, `gap` apart.
    pub fn send(&self, frames: &[Vec<u8>], gap: Duration) {
        let addr = sockaddr(self.ifindex);
        for frame in frames {
            // SAFETY: valid buffer and address with their sizes.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                n,
                frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
        }
    }
}

/// The UDP destination port of an Ethernet frame, if it carries UDP.
pub fn udp_dport(frame: &[u8]) -> Option<u16> {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
    match sliced.transport? {
        etherparse::TransportSlice::Udp(udp) => Some(udp.destination_port()),
        _ => None,
    }
}
