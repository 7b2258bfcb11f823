//! The test vectors of `docs/PROTOCOL.md` §11, read from the document's
//! text and checked without an allocator: the same check runs in the unit
//! tests, on an emulated Cortex-M (`cargo xtask mcu`), and against any
//! build a firmware author makes. Each vector block gives the inputs, then
//! every value derived from them; all of them are recomputed here.

use core::{fmt, net::IpAddr};

use crate::{
    DeviceKey, DoorKeys, DoorParams, KEY_LEN, KNOCK_LEN, Kind, Knock, NONCE_LEN, REPLY_LEN, Reply,
    Status, sequence, step_of,
};

/// The protocol document, whose §11 holds the vectors.
pub const PROTOCOL_MD: &str = include_str!("../../docs/PROTOCOL.md");

/// The first value a vector gets wrong, or cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure<'a> {
    /// The vector's name (`open`, `close`, …).
    pub vector: &'a str,
    /// The field: an input that does not parse, or a derived value that
    /// differs.
    pub field: &'static str,
    /// The knock, for `port` and `knock`.
    pub index: Option<u8>,
}

impl fmt::Display for Failure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vector {}: {}", self.vector, self.field)?;
        if let Some(i) = self.index {
            write!(f, ".{i}")?;
        }
        f.write_str(" is wrong or unreadable")
    }
}

/// One vector block: `name value` lines.
#[derive(Clone, Copy)]
pub struct Block<'a> {
    text: &'a str,
    /// The vector's name (`open`, `close`, …).
    pub name: &'a str,
}

impl<'a> Block<'a> {
    /// Its `name value` lines, in order (the first is `vector NAME`).
    pub fn fields(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.text.lines().filter_map(|line| line.split_once(' '))
    }

    fn get(&self, field: &str) -> Option<&'a str> {
        self.fields()
            .find_map(|(name, value)| (name == field).then_some(value))
    }

    /// `port.N` or `knock.N`.
    fn indexed(&self, field: &str, index: u8) -> Option<&'a str> {
        self.fields().find_map(|(name, value)| {
            let (base, n) = name.split_once('.')?;
            (base == field && n.parse::<u8>().ok()? == index).then_some(value)
        })
    }

    fn fail(&self, field: &'static str, index: Option<u8>) -> Failure<'a> {
        Failure {
            vector: self.name,
            field,
            index,
        }
    }
}

/// The vector blocks of `doc`: each ```` ```text ```` block that starts
/// with `vector NAME`.
pub fn blocks(doc: &str) -> impl Iterator<Item = Block<'_>> {
    doc.split("```text\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .filter_map(|text| {
            let name = text.lines().next()?.strip_prefix("vector ")?;
            Some(Block { text, name })
        })
}

/// Whether `hex` decodes to exactly `bytes`.
fn same<const N: usize>(hex: Option<&str>, bytes: &[u8; N]) -> bool {
    let mut expected = [0; N];
    hex.is_some_and(|h| hex::decode_to_slice(h, &mut expected).is_ok() && &expected == bytes)
}

fn decode<const N: usize>(hex: Option<&str>) -> Option<[u8; N]> {
    let mut out = [0; N];
    hex::decode_to_slice(hex?, &mut out).ok()?;
    Some(out)
}

/// Checks one vector: every derived value, and that what is built parses,
/// verifies and opens again.
fn check_one(v: Block<'_>) -> Result<(), Failure<'_>> {
    let key: [u8; KEY_LEN] = decode(v.get("key")).ok_or(v.fail("key", None))?;
    let door = v.get("door").ok_or(v.fail("door", None))?;
    let keys = DoorKeys::try_derive(&DeviceKey(key), door).map_err(|_| v.fail("door", None))?;
    if !same(v.get("port_key"), keys.port_key()) {
        return Err(v.fail("port_key", None));
    }
    if !same(v.get("mac_key"), keys.mac_key()) {
        return Err(v.fail("mac_key", None));
    }
    let (start, end) = v
        .get("knock_ports")
        .and_then(|r| r.split_once('-'))
        .ok_or(v.fail("knock_ports", None))?;
    let number = |field: &'static str| -> Result<u64, Failure<'_>> {
        v.get(field)
            .and_then(|n| n.parse().ok())
            .ok_or(v.fail(field, None))
    };
    let count = u8::try_from(number("count")?).map_err(|_| v.fail("count", None))?;
    let params = DoorParams {
        knock_ports: start.parse().map_err(|_| v.fail("knock_ports", None))?
            ..=end.parse().map_err(|_| v.fail("knock_ports", None))?,
        knocks: count,
        step_secs: u32::try_from(number("step_secs")?).map_err(|_| v.fail("step_secs", None))?,
    };
    let time_ms = number("time_ms")?;
    if step_of(time_ms, params.step_secs) != number("step")? {
        return Err(v.fail("step", None));
    }
    let kind = match v.get("kind") {
        Some("open") => Kind::Open,
        Some("close") => Kind::Close,
        Some("heartbeat") => Kind::Heartbeat,
        _ => return Err(v.fail("kind", None)),
    };
    let nonce: [u8; NONCE_LEN] = decode(v.get("nonce")).ok_or(v.fail("nonce", None))?;
    let bind: Option<IpAddr> = match v.get("bind") {
        Some("none") => None,
        Some(ip) => Some(ip.parse().map_err(|_| v.fail("bind", None))?),
        None => return Err(v.fail("bind", None)),
    };
    let knocks = sequence(&keys, &params, kind, time_ms, nonce, bind);
    if knocks.len() != usize::from(count) {
        return Err(v.fail("count", None));
    }
    for (i, (port, payload)) in (0u8..).zip(knocks.iter()) {
        if v.indexed("port", i).and_then(|p| p.parse::<u16>().ok()) != Some(*port) {
            return Err(v.fail("port", Some(i)));
        }
        if !same::<KNOCK_LEN>(v.indexed("knock", i), payload) {
            return Err(v.fail("knock", Some(i)));
        }
        match Knock::parse(payload) {
            Ok((parsed, raw)) if keys.verify(raw) && parsed.index == i && parsed.bind == bind => {}
            _ => return Err(v.fail("knock", Some(i))),
        }
    }
    if !same(v.get("reply_key"), &keys.reply_key(&nonce)) {
        return Err(v.fail("reply_key", None));
    }
    let mut fields = v
        .get("reply_fields")
        .ok_or(v.fail("reply_fields", None))?
        .split(' ');
    let mut field = || fields.next().ok_or(v.fail("reply_fields", None));
    let status = match field()? {
        "granted" => Status::Granted,
        "closed" => Status::Closed,
        "no_grant" => Status::NoGrant,
        _ => return Err(v.fail("reply_fields", None)),
    };
    let mut num = || -> Result<u64, Failure<'_>> {
        field()?.parse().map_err(|_| v.fail("reply_fields", None))
    };
    let reply = Reply {
        kind,
        nonce,
        status,
        port: u16::try_from(num()?).map_err(|_| v.fail("reply_fields", None))?,
        expires_in_secs: u32::try_from(num()?).map_err(|_| v.fail("reply_fields", None))?,
        server_time_ms: num()?,
    };
    let sealed = reply.seal(&keys);
    if !same::<REPLY_LEN>(v.get("reply"), &sealed) {
        return Err(v.fail("reply", None));
    }
    if Reply::open(&sealed, &keys, &nonce) != Ok(reply) {
        return Err(v.fail("reply", None));
    }
    Ok(())
}

/// Checks every vector in `doc` (the text of `docs/PROTOCOL.md`); returns
/// how many there were.
pub fn check(doc: &str) -> Result<usize, Failure<'_>> {
    let mut checked = 0;
    for block in blocks(doc) {
        check_one(block)?;
        checked += 1;
    }
    Ok(checked)
}

/// How many vectors `doc` has.
pub fn count(doc: &str) -> usize {
    blocks(doc).count()
}
