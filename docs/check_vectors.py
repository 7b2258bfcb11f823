#!/usr/bin/env python3
"""An independent implementation of docs/PROTOCOL.md, checked against the
test vectors in that document.

It uses only the Python standard library (HMAC-SHA256, and HKDF written out
from RFC 5869) and the `cryptography` package for ChaCha20-Poly1305, and
shares no code with the Rust implementation. Run it from anywhere:

    python3 docs/check_vectors.py          # check every vector
    python3 docs/check_vectors.py --print  # also print derived values
"""
import hashlib
import hmac
import ipaddress
import pathlib
import re
import sys

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

SALT = b"knockd/v1"


def hkdf_extract(salt, ikm):
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk, info, length=32):
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def info(label, door, extra=b""):
    return label + b"\0" + door + ((b"\0" + extra) if extra else b"")


def derive(key, door):
    prk = hkdf_extract(SALT, key)
    return prk, hkdf_expand(prk, info(b"port", door)), hkdf_expand(prk, info(b"mac", door))


def port(port_key, step, index, start, end):
    digest = hmac.new(port_key, step.to_bytes(8, "big") + bytes([index]), hashlib.sha256).digest()
    return start + int.from_bytes(digest[:4], "big") % (end - start + 1)


KINDS = {"open": 1, "close": 2, "heartbeat": 3}
STATUS = {"granted": 0, "closed": 1, "no_grant": 2}


def knock(mac_key, kind, index, count, step, time_ms, nonce, bind):
    body = bytes([1, KINDS[kind], index, count])
    body += step.to_bytes(8, "big") + time_ms.to_bytes(8, "big") + nonce
    if bind == "none":
        body += bytes(16)
    else:
        addr = ipaddress.ip_address(bind)
        if addr.version == 4:
            addr = ipaddress.IPv6Address("::ffff:" + bind)
        body += addr.packed
    return body + hmac.new(mac_key, body, hashlib.sha256).digest()[:16]


def reply(prk, door, kind, nonce, status, port_, expires, server_ms):
    header = bytes([1, 0x80 | KINDS[kind]]) + nonce
    plain = bytes([STATUS[status], 0]) + port_.to_bytes(2, "big")
    plain += expires.to_bytes(4, "big") + server_ms.to_bytes(8, "big")
    key = hkdf_expand(prk, info(b"reply", door, nonce))
    return key, header + ChaCha20Poly1305(key).encrypt(bytes(12), plain, header)


def vectors(text):
    """Yields each `vector` block of PROTOCOL.md as a dict."""
    for block in re.findall(r"```text\n(vector .*?)```", text, re.S):
        fields = {}
        for line in block.strip().splitlines():
            name, _, value = line.partition(" ")
            fields[name] = value.strip()
        yield fields


def check(v, show):
    key, door = bytes.fromhex(v["key"]), v["door"].encode()
    start, end = map(int, v["knock_ports"].split("-"))
    time_ms, step_secs = int(v["time_ms"]), int(v["step_secs"])
    step = time_ms // (step_secs * 1000)
    assert step == int(v["step"]), ("step", step)
    prk, port_key, mac_key = derive(key, door)
    nonce = bytes.fromhex(v["nonce"])
    count = int(v["count"])
    got = {"port_key": port_key.hex(), "mac_key": mac_key.hex()}
    for i in range(count):
        got[f"port.{i}"] = str(port(port_key, step, i, start, end))
        got[f"knock.{i}"] = knock(mac_key, v["kind"], i, count, step, time_ms, nonce, v["bind"]).hex()
    status, port_, expires, server_ms = v["reply_fields"].split()
    reply_key, sealed = reply(prk, door, v["kind"], nonce, status, int(port_), int(expires), int(server_ms))
    got["reply_key"], got["reply"] = reply_key.hex(), sealed.hex()
    for name, value in got.items():
        if show:
            print(f"{v['vector']:>10} {name:<10} {value}")
        assert v.get(name) == value, f"vector {v['vector']}: {name}: document says {v.get(name)}, computed {value}"


def main():
    show = "--print" in sys.argv
    text = (pathlib.Path(__file__).parent / "PROTOCOL.md").read_text()
    found = list(vectors(text))
    assert found, "no vectors in PROTOCOL.md"
    for v in found:
        check(v, show)
    print(f"{len(found)} passed, 0 failed: the PROTOCOL.md vectors, recomputed independently in Python")


if __name__ == "__main__":
    main()
