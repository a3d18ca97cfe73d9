"""The wireguard backend's options: the config's Backend object, validated (pure).

The reference's keys and defaults: `{"Type": "wireguard", "PSK": "", "ListenPort": 51820,
"ListenPortV6": 51821, "PersistentKeepaliveInterval": 0, "Mode": "separate"}`, keys in any case.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flanneld.core.config import ConfigError, ci_get, int_field

from .keys import BadKey, decode_key

DEFAULT_PORT = 51820
DEFAULT_PORT6 = 51821
MODES = ("separate", "auto", "ipv4", "ipv6")
AT = "Backend."


@dataclass(frozen=True)
class WireguardOptions:
    listen_port: int = DEFAULT_PORT
    listen_port6: int = DEFAULT_PORT6
    keepalive: int = 0  # seconds; 0: off
    psk: bytes | None = None  # 32 bytes, or none
    mode: str = "separate"


def parse_options(options: Mapping[str, Any]) -> WireguardOptions:
    """ListenPort, ListenPortV6, PersistentKeepaliveInterval, PSK and Mode with the
    reference's defaults; ConfigError naming the key and the fix. Port 0 means the default."""
    obj = dict(options)
    psk_text = ci_get(obj, "PSK", "")
    if psk_text is None:
        psk_text = ""
    if not isinstance(psk_text, str):
        raise ConfigError(
            f"network config: {AT}PSK must be a string (got {json.dumps(psk_text)}); write the "
            'base64 key `wg genpsk` prints, or "" for none'
        )
    psk = None
    if psk_text:
        try:
            psk = decode_key(psk_text)
        except BadKey as e:
            raise ConfigError(
                f"network config: {AT}PSK {e}; write the base64 key `wg genpsk` prints, "
                'or "" for none'
            ) from None
    mode = ci_get(obj, "Mode", "separate")
    if mode is None or mode == "":
        mode = "separate"
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise ConfigError(
            f"network config: {AT}Mode must be one of {', '.join(MODES)} "
            f"(got {json.dumps(mode)}); fix the value or remove it"
        )
    return WireguardOptions(
        listen_port=int_field(obj, "ListenPort", 0, 65535, AT) or DEFAULT_PORT,
        listen_port6=int_field(obj, "ListenPortV6", 0, 65535, AT) or DEFAULT_PORT6,
        keepalive=int_field(obj, "PersistentKeepaliveInterval", 0, 65535, AT) or 0,
        psk=psk,
        mode=mode.lower(),
    )
