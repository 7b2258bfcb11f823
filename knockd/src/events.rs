//! Knock events from the XDP program: reading the ring buffer and decoding
//! its records.
//!
//! The records come from our own kernel code, but their payload bytes come
//! straight off the network, so decoding checks every length and never
//! panics.

use std::net::SocketAddr;

use aya::maps::{MapData, RingBuf};
use knockd_common::{KNOCK_PAYLOAD_MAX, KnockEvent};
use tokio::io::unix::AsyncFd;

use crate::maps::{Proto, addr_from_key};

/// Most records handled per wake-up, so a flood cannot starve the rest of the
/// daemon: the reader yields and comes back.
const BATCH_MAX: usize = 1024;

/// A record that is not a valid [`KnockEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("knock record of {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("knock record with IP protocol {0}, expected TCP or UDP")]
    Proto(u8),
    #[error("knock record with address family {0}, expected 4 or 6")]
    Family(u8),
    #[error("knock record claims {0} captured bytes, at most {KNOCK_PAYLOAD_MAX} fit")]
    Captured(u16),
    /// An IPv6 packet from or to an IPv4-mapped address (`::ffff:a.b.c.d`):
    /// the stack drops those (RFC 4291 2.5.5.2), and taken at face value it
    /// would be a knock that opens a door for an IPv4 address.
    #[error("IPv{0} knock record with an address of the other family")]
    Mixed(u8),
}

/// A knock as XDP (or, without XDP, the packet socket) saw it: what the
/// engine judges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenKnock {
    /// `CLOCK_MONOTONIC` nanoseconds when the XDP program saw the packet.
    pub at_ns: u64,
    /// Who knocked. IPv4 sources are plain IPv4 here.
    pub source: SocketAddr,
    /// The knocked address and port; a reply must come from here.
    pub destination: SocketAddr,
    /// UDP, or TCP for SYN knocks.
    pub proto: Proto,
    /// The interface it arrived on.
    pub ifindex: u32,
    /// The TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// The payload length the headers state; `payload` may be shorter.
    pub payload_len: u16,
    /// The captured start of the payload.
    pub payload: Vec<u8>,
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<SeenKnock, DecodeError> {
    let expected = std::mem::size_of::<KnockEvent>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length is exactly one KnockEvent, which is plain old data
    // (repr(C), no padding, any bit pattern valid); the read is unaligned
    // because ring-buffer records are only 8-byte aligned by convention.
    let event: KnockEvent = unsafe { bytes.as_ptr().cast::<KnockEvent>().read_unaligned() };
    let proto = Proto::from_number(event.proto).ok_or(DecodeError::Proto(event.proto))?;
    if event.family != 4 && event.family != 6 {
        return Err(DecodeError::Family(event.family));
    }
    let captured = usize::from(event.captured_len);
    if captured > KNOCK_PAYLOAD_MAX {
        return Err(DecodeError::Captured(event.captured_len));
    }
    let (source, destination) = (addr_from_key(event.saddr), addr_from_key(event.daddr));
    let v4 = event.family == 4;
    if source.is_ipv4() != v4 || destination.is_ipv4() != v4 {
        return Err(DecodeError::Mixed(event.family));
    }
    Ok(SeenKnock {
        at_ns: event.ts_ns,
        source: SocketAddr::new(source, event.sport),
        destination: SocketAddr::new(destination, event.dport),
        proto,
        ifindex: event.ifindex,
        tcp_flags: event.tcp_flags,
        payload_len: event.payload_len,
        payload: event.payload[..captured].to_vec(),
    })
}

/// Reads knock records as the kernel produces them.
pub struct KnockReader {
    /// The ring buffer, registered with tokio for readiness.
    ring: AsyncFd<RingBuf<MapData>>,
}

impl KnockReader {
    /// Wraps the ring buffer taken from the loaded object.
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd for as long as it lives, and
        // as_raw_fd always returns that same fd.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
        Ok(KnockReader { ring })
    }

    /// Waits for records and returns up to [`BATCH_MAX`] of them, each
    /// decoded or the reason it could not be.
    pub async fn read(&mut self) -> std::io::Result<Vec<Result<SeenKnock, DecodeError>>> {
        loop {
            let mut ready = self.ring.readable_mut().await?;
            let ring = ready.get_inner_mut();
            let mut batch = Vec::new();
            while batch.len() < BATCH_MAX {
                match ring.next() {
                    Some(record) => batch.push(decode(&record)),
                    None => break,
                }
            }
            // Only forget readiness once the buffer is empty; a full batch
            // means there is more, and the next call must not wait for it.
            if batch.len() < BATCH_MAX {
                ready.clear_ready();
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use knockd_common::{IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    fn record(event: &KnockEvent) -> Vec<u8> {
        // SAFETY: KnockEvent is plain old data without padding.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const KnockEvent).cast::<u8>(),
                std::mem::size_of::<KnockEvent>(),
            )
        }
        .to_vec()
    }

    fn sample() -> KnockEvent {
        let mut payload = [0; KNOCK_PAYLOAD_MAX];
        payload[..3].copy_from_slice(b"abc");
        let mut saddr = [0; 16];
        saddr[10] = 0xff;
        saddr[11] = 0xff;
        saddr[12..].copy_from_slice(&[198, 18, 0, 2]);
        let mut daddr = saddr;
        daddr[15] = 1;
        KnockEvent {
            ts_ns: 42,
            saddr,
            daddr,
            sport: 40000,
            dport: 7000,
            ifindex: 3,
            proto: IPPROTO_UDP,
            family: 4,
            tcp_flags: 0,
            _pad: 0,
            payload_len: 3,
            captured_len: 3,
            payload,
        }
    }

    #[test]
    fn decodes_a_udp_knock() {
        let knock = decode(&record(&sample())).unwrap();
        assert_eq!(knock.source, "198.18.0.2:40000".parse().unwrap());
        assert_eq!(knock.destination, "198.18.0.1:7000".parse().unwrap());
        assert_eq!(knock.proto, Proto::Udp);
        assert_eq!(knock.payload, b"abc");
        assert_eq!((knock.at_ns, knock.ifindex, knock.payload_len), (42, 3, 3));
    }

    #[test]
    fn rejects_bad_records_without_panicking() {
        let good = record(&sample());
        assert!(matches!(decode(&good[..10]), Err(DecodeError::Size { .. })));
        assert!(matches!(decode(&[]), Err(DecodeError::Size { .. })));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(DecodeError::Size { .. })));

        let mut e = sample();
        e.proto = 1;
        assert_eq!(decode(&record(&e)), Err(DecodeError::Proto(1)));
        let mut e = sample();
        e.family = 5;
        assert_eq!(decode(&record(&e)), Err(DecodeError::Family(5)));
        let mut e = sample();
        e.captured_len = KNOCK_PAYLOAD_MAX as u16 + 1;
        assert!(matches!(decode(&record(&e)), Err(DecodeError::Captured(_))));
        // Found by the event_decode fuzz target: an IPv6 record whose
        // source is IPv4-mapped would have named an IPv4 source.
        let mut e = sample();
        e.family = 6;
        assert_eq!(decode(&record(&e)), Err(DecodeError::Mixed(6)));
        let mut e = sample();
        e.daddr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(decode(&record(&e)), Err(DecodeError::Mixed(4)));
        let mut e = sample();
        e.proto = IPPROTO_TCP;
        e.captured_len = KNOCK_PAYLOAD_MAX as u16;
        assert_eq!(
            decode(&record(&e)).unwrap().payload.len(),
            KNOCK_PAYLOAD_MAX
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A deterministic xorshift sweep over lengths around the record size.
        let size = std::mem::size_of::<KnockEvent>();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for len in [0, 1, size - 1, size, size + 1] {
            for _ in 0..2000 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| crate::xorshift(&mut state) as u8)
                    .collect();
                let _ = decode(&bytes);
            }
        }
    }
}
