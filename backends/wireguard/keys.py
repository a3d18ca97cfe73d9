"""WireGuard keys (pure): X25519 (RFC 7748) to derive a public key from a private one, the
base64 and hex spellings, and the checks a peer's announced key must pass.

The X25519 here is plain Python integers, not constant-time: it runs once per agent start, on
the node's own key, never on anything a peer sends (peers' keys are only decoded and checked).
"""

from __future__ import annotations

import base64
import binascii

KEY_LEN = 32
P = 2**255 - 19
A24 = 121665
BASEPOINT = (9).to_bytes(KEY_LEN, "little")

# u-coordinates of small order (and their non-canonical forms below 2^255): a public key of one
# of these gives an all-zero shared secret, so WireGuard can never complete a handshake with it.
_SMALL_ORDER = {
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,
    P + 1,
}


class BadKey(ValueError):
    """A key that is not 32 bytes of base64 (or hex), or cannot be a peer's; says what."""


def clamp(scalar: bytes) -> bytes:
    """A private key as X25519 uses it (RFC 7748 section 5; `wg genkey` clamps too)."""
    b = bytearray(scalar)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return bytes(b)


def x25519(scalar: bytes, u: bytes) -> bytes:
    """X25519(k, u) of RFC 7748 section 5: the Montgomery ladder over Curve25519."""
    if len(scalar) != KEY_LEN or len(u) != KEY_LEN:
        raise BadKey(f"X25519 takes {KEY_LEN}-byte inputs")
    k = int.from_bytes(clamp(scalar), "little")
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (k >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % P, (x2 - z2) % P
        aa, bb = a * a % P, b * b % P
        e = (aa - bb) % P
        c, d = (x3 + z3) % P, (x3 - z3) % P
        da, cb = d * a % P, c * b % P
        x3 = (da + cb) ** 2 % P
        z3 = x1 * (da - cb) ** 2 % P
        x2 = aa * bb % P
        z2 = e * (aa + A24 * e) % P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, P - 2, P) % P).to_bytes(KEY_LEN, "little")


def public_key(private: bytes) -> bytes:
    """The public key of a private key (what `wg pubkey` prints, before base64)."""
    return x25519(private, BASEPOINT)


def encode_key(key: bytes) -> str:
    """The base64 spelling of a key (records, key files, `wg`)."""
    return base64.b64encode(key).decode()


def decode_key(text: str) -> bytes:
    """A base64 key (44 characters, as `wg` prints them) as 32 bytes; BadKey otherwise."""
    if not isinstance(text, str):
        raise BadKey(f"is not a string (got {type(text).__name__})")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadKey(f"{text[:60]!r} is not base64") from None
    if len(raw) != KEY_LEN:
        raise BadKey(f"{text[:60]!r} is {len(raw)} bytes, not {KEY_LEN}")
    return raw


def peer_key_problem(key: bytes) -> str:
    """Why `key` cannot be a peer's public key ("" when it can): one of small order, with
    which no handshake can succeed (the all-zero key among them)."""
    if int.from_bytes(key, "little") & ((1 << 255) - 1) in _SMALL_ORDER:
        return "it is a point of small order, which no handshake can use"
    return ""
