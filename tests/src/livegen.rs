//! A packet generator that needs no pktgen module: `BPF_PROG_TEST_RUN` in
//! live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux 5.18) runs a tiny
//! XDP program (`return XDP_TX`, after rewriting sources, ports or payload
//! with random bytes if asked) over one frame millions of times, and the
//! kernel transmits every copy out of the interface the run names, as a
//! driver's XDP_TX would. Out of one end of a veth pair, the
//! frames arrive at the other end's XDP program (or, with GRO on, its
//! stack) at rates AF_PACKET cannot reach.
//!
//! Also a bare `XDP_DROP` program to attach, the baseline a guard is
//! measured against. They are loaded with the raw `bpf(2)` syscall: they
//! are a few instructions each, and aya loads only ELF objects.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;

/// `bpf_attr` for `BPF_PROG_LOAD`, as far as it is used here; the kernel
/// takes a shorter attribute and treats the rest as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `bpf_attr` for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the kernel refuses an attribute whose bytes
    /// past the command's last field are not.
    _pad: u32,
}

/// `bpf_attr` for `BPF_LINK_CREATE` of an XDP link.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `struct xdp_md`, the context a test run starts from.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly laid out bpf_attr prefix of the
    // size passed; the kernel reads and writes only within it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An XDP program that returns `action` and does nothing else.
pub fn xdp_returning(action: i32, name: &str) -> io::Result<OwnedFd> {
    // mov64 r0, action; exit
    load(&[insn(0xb7, 0, 0, 0, action), insn(0x95, 0, 0, 0, 0)], name)
}

/// Loads `insns` as an XDP program.
fn load(insns: &[u64], name: &str) -> io::Result<OwnedFd> {
    // The helper the randomizer calls is GPL-only.
    let license = c"GPL";
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoad::default()
    };
    for (slot, byte) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One eBPF instruction: opcode, destination and source registers, offset,
/// immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst as u64 | (src as u64) << 4) << 8)
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

/// What a randomizing generator rewrites in each frame before sending it.
#[derive(Debug, Clone, Default)]
pub struct Randomize {
    /// Offsets of 4-byte words to fill with random bytes (source addresses,
    /// payload).
    pub words: Vec<i16>,
    /// Offsets of 2-byte fields to fill with random bytes (the low half of
    /// an IPv4 source, to stay inside 198.18.0.0/16).
    pub halves: Vec<i16>,
    /// A big-endian port at this offset set to `base + random % span`.
    pub port: Option<(i16, u16, u16)>,
}

/// A generator program (XDP_TX) that first rewrites the fields `what`
/// names with `bpf_get_prandom_u32`, so one template frame becomes a flood
/// from random sources to random ports with random payloads. Frames too
/// short for the fields go out unchanged.
pub fn randomizing_tx(what: &Randomize, name: &str) -> io::Result<OwnedFd> {
    const LDXW: u8 = 0x61;
    const STXW: u8 = 0x63;
    const STXH: u8 = 0x6b;
    const MOV64_X: u8 = 0xbf;
    const MOV64_K: u8 = 0xb7;
    const ADD64_K: u8 = 0x07;
    const MOD64_K: u8 = 0x97;
    const TO_BE: u8 = 0xdc;
    const JGT_X: u8 = 0x2d;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const GET_PRANDOM_U32: i32 = 7;
    let end = what
        .words
        .iter()
        .map(|&o| o + 4)
        .chain(what.halves.iter().map(|&o| o + 2))
        .chain(what.port.map(|(o, _, _)| o + 2))
        .max()
        .unwrap_or(0);
    let mut body = Vec::new();
    for &offset in &what.words {
        body.push(insn(CALL, 0, 0, 0, GET_PRANDOM_U32));
        body.push(insn(STXW, 6, 0, offset, 0));
    }
    for &offset in &what.halves {
        body.push(insn(CALL, 0, 0, 0, GET_PRANDOM_U32));
        body.push(insn(STXH, 6, 0, offset, 0));
    }
    if let Some((offset, base, span)) = what.port {
        body.push(insn(CALL, 0, 0, 0, GET_PRANDOM_U32));
        body.push(insn(MOD64_K, 0, 0, 0, i32::from(span)));
        body.push(insn(ADD64_K, 0, 0, 0, i32::from(base)));
        body.push(insn(TO_BE, 0, 0, 0, 16));
        body.push(insn(STXH, 6, 0, offset, 0));
    }
    let mut insns = vec![
        // r6 = ctx->data, r7 = ctx->data_end
        insn(LDXW, 6, 1, 0, 0),
        insn(LDXW, 7, 1, 4, 0),
        // if r6 + end > r7: skip the rewrites
        insn(MOV64_X, 2, 6, 0, 0),
        insn(ADD64_K, 2, 0, 0, i32::from(end)),
        insn(JGT_X, 2, 7, body.len() as i16, 0),
    ];
    insns.extend(body);
    insns.push(insn(MOV64_K, 0, 0, 0, XDP_TX));
    insns.push(insn(EXIT, 0, 0, 0, 0));
    load(&insns, name)
}

/// Attaches `prog` to the interface `ifindex` (of the calling thread's
/// namespace) through a link: it stays attached while the returned
/// descriptor lives.
pub fn attach_xdp(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `frame` `count` times out of `ifindex` (in the calling thread's
/// namespace) through `tx_prog`, which must return XDP_TX. Frames the far
/// end cannot take are dropped there and counted in its statistics.
pub fn transmit(tx_prog: &OwnedFd, ifindex: u32, frame: &[u8], count: u32) -> io::Result<()> {
    let mut ctx = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex: ifindex,
        ..XdpMd::default()
    };
    let mut attr = TestRun {
        prog_fd: tx_prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: count,
        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
        ctx_in: &mut ctx as *mut XdpMd as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..TestRun::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).map(drop)
}

/// The interface index of `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        index => Ok(index),
    }
}

/// Pins the thread or process `tid` (0: the caller) to one CPU.
pub fn pin_to_cpu(tid: libc::pid_t, cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
