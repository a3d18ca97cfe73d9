"""The node's WireGuard private key on disk: created once (mode 0400, base64 as `wg genkey`
writes it) and read back on every start, so the public key in the lease never changes.

Where: `WIREGUARD_KEY_FILE` (the reference's variable), else `<state-dir>/wgkey` (the
reference keeps it in `/run/flannel/wgkey`, which a reboot empties: a new key each boot).
A PSK may come from the file named by `WIREGUARD_PSK_FILE` instead of the config's `PSK`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ..base import BackendError
from .keys import BadKey, clamp, decode_key, encode_key

log = logging.getLogger(__name__)

KEY_FILE_ENV = "WIREGUARD_KEY_FILE"
PSK_FILE_ENV = "WIREGUARD_PSK_FILE"
DEFAULT_NAME = "wgkey"


def key_path(environ: Mapping[str, str], state_dir: Path) -> Path:
    return Path(environ.get(KEY_FILE_ENV) or state_dir / DEFAULT_NAME)


def _read(path: Path, what: str, fix: str) -> bytes:
    try:
        return decode_key(path.read_text())
    except BadKey as e:
        raise BackendError(f"{what} {path}: the key {e}; {fix}") from None
    except OSError as e:
        raise BackendError(f"cannot read {what} {path} ({e.strerror}); {fix}") from None


def load_or_create(path: Path) -> tuple[bytes, bool]:
    """The private key in `path`, made (random, clamped) when the file does not exist; and
    whether it was made now. A group- or world-readable file is set to 0400 (one line)."""
    fix = f"delete it to have a new key made (peers follow at once), or set {KEY_FILE_ENV}"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return _create(path), True
    except OSError as e:
        raise BackendError(
            f"cannot read the WireGuard key file {path} ({e.strerror}); {fix}"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        path.chmod(0o400)
        log.warning("WireGuard key file %s was readable by others; set to mode 0400", path)
    return _read(path, "the WireGuard key file", fix), False


def _create(path: Path) -> bytes:
    key = clamp(os.urandom(32))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, (encode_key(key) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # fails if another start made one meanwhile: that one is kept
    except FileExistsError:
        return _read(path, "the WireGuard key file", "delete it to have a new key made")
    except OSError as e:
        raise BackendError(
            f"cannot write the WireGuard key file {path} ({e.strerror}); make its directory "
            f"writable or point {KEY_FILE_ENV} elsewhere"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    log.info("WireGuard key file %s created (mode 0400)", path)
    return key


def load_psk(environ: Mapping[str, str]) -> bytes | None:
    """The PSK in the file `WIREGUARD_PSK_FILE` names, or None when it is not set."""
    name = environ.get(PSK_FILE_ENV)
    if not name:
        return None
    return _read(
        Path(name),
        "the WireGuard PSK file",
        f"write `wg genpsk` output there or unset {PSK_FILE_ENV}",
    )
