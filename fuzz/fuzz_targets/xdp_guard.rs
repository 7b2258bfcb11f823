//! The XDP program itself, through BPF_PROG_TEST_RUN (needs root), judged
//! by an oracle that parses each frame the way the kernel's receive path
//! would: if the stack could deliver a new TCP connection (a SYN without
//! ACK) or a UDP datagram to a protected port, the guard must not have
//! passed it. The oracle errs towards "the stack would deliver", so it
//! never excuses a pass the guard should not have made.
//!
//! Policy loaded: TCP 22 and 40000-40010 protected, UDP 5353 protected, UDP
//! 7000 and TCP 8000 knock ports; no grants.
#![no_main]

use std::sync::OnceLock;

use aya::programs::{TestRun as _, TestRunOptions};
use knockd::{
    guard::{Guard, KernelLogLevel},
    maps::{GuardMaps, PortPolicy, Proto},
};
use knockd_common::policy;
use libfuzzer_sys::fuzz_target;

const XDP_PASS: u32 = 2;

struct Bench {
    guard: Guard,
    _maps: GuardMaps,
}

// SAFETY: the program and maps are only used behind the fuzzer's single
// thread; aya's handles are file descriptors.
unsafe impl Sync for Bench {}
unsafe impl Send for Bench {}

fn bench() -> &'static Bench {
    static BENCH: OnceLock<Bench> = OnceLock::new();
    BENCH.get_or_init(|| {
        let (mut guard, _logger) =
            Guard::load(KernelLogLevel::Warn).expect("loading the guard (root?)");
        let mut maps = GuardMaps::take(guard.ebpf_mut(), None).expect("its maps");
        let mut table = PortPolicy::empty();
        table.set(Proto::Tcp, 22, policy::PROTECTED);
        for port in 40000..=40010 {
            table.set(Proto::Tcp, port, policy::PROTECTED);
        }
        table.set(Proto::Udp, 5353, policy::PROTECTED);
        table.set(Proto::Udp, 7000, policy::KNOCK | policy::PROTECTED);
        table.set(Proto::Tcp, 8000, policy::KNOCK | policy::PROTECTED);
        maps.apply_port_policy(&table).expect("policy");
        maps.set_knock_rate(1_000_000, 1_000_000).expect("rate");
        Bench { guard, _maps: maps }
    })
}

fn protected(tcp: bool, port: u16) -> bool {
    if tcp {
        port == 22 || port == 8000 || (40000..=40010).contains(&port)
    } else {
        port == 5353 || port == 7000
    }
}

/// What the stack could hand a socket: (TCP?, destination port, new
/// connection?) for a packet that reaches the transport layer whole or as
/// the first fragment of a datagram; a port of `None` is one later
/// fragments could supply, so any. `None`: nothing a socket would see.
fn stack_delivers(frame: &[u8]) -> Option<(bool, Option<u16>, bool)> {
    let be16 = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
    };
    let mut ethertype = be16(12)?;
    let mut at = 14;
    // The stack peels any number of tags (priority tags always; other VIDs
    // through VLAN devices): assume it does.
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = be16(at + 2)?;
        at += 4;
    }
    let (proto, l4, end, fragmented) = match ethertype {
        0x0800 => {
            let vihl = *frame.get(at)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return None;
            }
            let total = usize::from(be16(at + 2)?);
            if total < ihl || at + total > frame.len() {
                return None;
            }
            // A non-first fragment carries no transport header.
            let frag = be16(at + 6)?;
            if frag & 0x1fff != 0 {
                return None;
            }
            (
                *frame.get(at + 9)?,
                at + ihl,
                at + total,
                frag & 0x2000 != 0,
            )
        }
        0x86dd => {
            if *frame.get(at)? >> 4 != 6 {
                return None;
            }
            let payload = usize::from(be16(at + 4)?);
            let end = at + 40 + payload;
            if end > frame.len() {
                return None;
            }
            let mut next = *frame.get(at + 6)?;
            let mut cursor = at + 40;
            let mut fragmented = false;
            // Extension headers, as many as there are.
            loop {
                match next {
                    6 | 17 => break,
                    0 | 43 | 60 => {
                        let len = (usize::from(*frame.get(cursor + 1)?) + 1) * 8;
                        next = *frame.get(cursor)?;
                        cursor += len;
                    }
                    51 => {
                        let len = (usize::from(*frame.get(cursor + 1)?) + 2) * 4;
                        next = *frame.get(cursor)?;
                        cursor += len;
                    }
                    44 => {
                        let offset_flags = be16(cursor + 2)?;
                        if offset_flags >> 3 != 0 {
                            return None;
                        }
                        fragmented |= offset_flags & 1 != 0;
                        next = *frame.get(cursor)?;
                        cursor += 8;
                    }
                    _ => return None,
                }
                if cursor > end {
                    return None;
                }
            }
            (next, cursor, end, fragmented)
        }
        _ => return None,
    };

    // A first fragment may get the rest of its transport header from later
    // fragments: judge by what the stack could assemble, assuming the worst
    // (a new connection) when the flags are not in this frame.
    let tcp = match proto {
        6 => true,
        17 => false,
        _ => return None,
    };
    let dport = if l4 + 4 <= end {
        Some(be16(l4 + 2)?)
    } else if fragmented {
        None
    } else {
        // Unfragmented and too short: the stack drops it.
        return None;
    };
    let new_connection = if tcp {
        match frame.get(l4 + 13) {
            Some(&flags) if l4 + 14 <= end => flags & 0x02 != 0 && flags & 0x10 == 0,
            _ if fragmented => true,
            _ => return None,
        }
    } else {
        true
    };
    Some((tcp, dport, new_connection))
}

fuzz_target!(|frame: &[u8]| {
    if frame.len() < 14 || frame.len() > 1500 {
        return;
    }
    let bench = bench();
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    };
    let action = bench
        .guard
        .program()
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN")
        .return_value;
    if action == XDP_PASS
        && let Some((tcp, port, new)) = stack_delivers(frame)
    {
        assert!(
            !(new && port.is_none_or(|port| protected(tcp, port))),
            "the guard passed a frame the stack could deliver to protected {} port {port:?}: {frame:02x?}",
            if tcp { "TCP" } else { "UDP" }
        );
    }
});
