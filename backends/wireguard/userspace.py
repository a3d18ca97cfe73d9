"""wireguard-go as the backend's device where the kernel has no WireGuard: the agent opens the
TUN device and the UAPI socket itself and hands both to a wireguard-go child, then talks to it
over that socket (`uapi`'s text protocol).

Why the agent opens them: wireguard-go would put its socket at the hard-coded
/var/run/wireguard/<ifname>.sock, one path for every network namespace on a host, so lab
nodes (namespaces sharing one filesystem) would collide. With `WG_TUN_FD` and `WG_UAPI_FD` it
takes the agent's TUN (created in the agent's namespace) and the agent's listening socket
(`<state-dir>/wireguard/<ifname>.sock`), and `WG_PROCESS_FOREGROUND=1` keeps it from forking
away. wireguard-go still watches /var/run/wireguard/<ifname>.sock with inotify and exits when
that path is gone, so the agent keeps a symlink there to its socket (on a shared filesystem:
the last agent's; only wireguard-go's check and `wg show` use it, never the agent).

Lifetime: the child runs in its own session, so it outlives the agent: a restarted agent finds
it answering on its socket and adopts it, and traffic never stops (the key is in the state
directory, so it is the same key either way). A child that died, or whose device was deleted
(wireguard-go exits then), is started again by the next pass; `flannelctl cleanup` deletes
the device, which ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

from ..base import BackendError
from .uapi import GET, DeviceState, PeerConfig, UapiError, check_errno, parse_get, set_request

log = logging.getLogger(__name__)

PROGRAM = "wireguard-go"
WATCHED_DIR = Path("/var/run/wireguard")
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
START_TIMEOUT = 5.0
REQUEST_TIMEOUT = 5.0


def open_tun(name: str) -> int:
    """A TUN device `name`, its fd. With the 4-byte packet-info header: wireguard-go opens
    its own TUN that way (IFF_NO_PI off, for its carrier-status hack) and reads a TUN it is
    handed as such, so a TUN without it loses every packet ("unknown IP version")."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN))
    except OSError:
        os.close(fd)
        raise
    return fd


class UserspaceDevice:
    """The device `name` driven by a wireguard-go child through the socket in `run_dir`."""

    kind = "userspace"

    def __init__(self, name: str, run_dir: Path) -> None:
        self.name = name
        self.run_dir = run_dir
        self.socket_path = run_dir / f"{name}.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0  # children started by this agent
        self._adopted = False  # serving when this agent started: not its child

    def __str__(self) -> str:
        pid = f"pid {self.proc.pid}" if self.proc else "adopted"
        return f"userspace wireguard-go ({pid}) on {self.socket_path}"

    @staticmethod
    def available() -> str:
        """ "" when wireguard-go can be run, else why not and the fix."""
        if shutil.which(PROGRAM) is None:
            return f"{PROGRAM} is not installed; install it (apt-get install {PROGRAM})"
        if not os.path.exists("/dev/net/tun"):
            return "/dev/net/tun is missing; load the tun module (modprobe tun)"
        return ""

    # -- the UAPI socket ----------------------------------------------------------------------
    async def _request(self, data: bytes) -> str:
        async def talk() -> str:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            try:
                writer.write(data)
                await writer.drain()
                answer = b""
                while not answer.endswith(b"\n\n"):
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    answer += chunk
                return answer.decode(errors="replace")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        try:
            return await asyncio.wait_for(talk(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError) as e:
            raise UapiError(f"wireguard-go does not answer on {self.socket_path}: {e}") from None

    async def get(self) -> DeviceState:
        return parse_get(await self._request(GET))

    async def set(
        self,
        private_key: bytes | None = None,
        listen_port: int | None = None,
        remove: list[bytes] | None = None,
        upsert: list[PeerConfig] | None = None,
    ) -> None:
        check_errno(
            await self._request(set_request(private_key, listen_port, remove or (), upsert or ()))
        )

    async def answers(self) -> bool:
        """Something listens on the socket: a wireguard-go holds it (a dead one's socket file
        refuses connections). Only a connection, no request: cheap at any number of peers."""
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path)), REQUEST_TIMEOUT
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    # -- the child ----------------------------------------------------------------------------
    def child_alive(self) -> bool | None:
        """True/False for a child this agent started, None for an adopted one (ask `answers`)."""
        if self.proc is None:
            return None
        return self.proc.poll() is None

    async def ensure(self, cheap: bool = False) -> bool:
        """wireguard-go serving the device: started when it is not; True when started now (the
        device is new and empty). `cheap` (event passes): trust an adopted child unasked."""
        alive = self.child_alive()
        if alive:
            return False
        if alive is None:  # no child of ours: one of an earlier agent may serve the socket
            if cheap and self._adopted:
                return False
            if await self.answers():
                if not self._adopted:
                    self._adopted = True
                    log.info("wireguard: adopted the wireguard-go serving %s", self.socket_path)
                return False
        else:
            log.warning(
                "wireguard: wireguard-go (pid %d) exited with status %s; starting it again",
                self.proc.pid,
                self.proc.returncode,
            )
            self.proc = None
        self._adopted = False
        await self._start()
        return True

    def _watched_path(self) -> None:
        """/var/run/wireguard/<name>.sock present (wireguard-go exits without it)."""
        link = WATCHED_DIR / f"{self.name}.sock"
        if link.exists():  # follows the symlink: a live target is left as it is
            return
        WATCHED_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = WATCHED_DIR / f".{self.name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.socket_path)
        tmp.replace(link)

    async def _start(self) -> None:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            tun = open_tun(self.name)
        except OSError as e:
            hint = {
                errno.EBUSY: f"another process holds {self.name}; stop it or delete the device",
                errno.EPERM: "run as root or with CAP_NET_ADMIN",
            }.get(e.errno or 0, "check /dev/net/tun and the tun module")
            raise BackendError(
                f"cannot create TUN device {self.name}: {e.strerror}; {hint}"
            ) from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()  # a dead child's (nothing answered on it)
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            listener.listen(16)
            self._watched_path()
            env = {
                "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "WG_TUN_FD": str(tun),
                "WG_UAPI_FD": str(listener.fileno()),
                "WG_PROCESS_FOREGROUND": "1",
                "LOG_LEVEL": "error",
            }
            with open(self.run_dir / f"{PROGRAM}.log", "ab") as out:
                self.proc = subprocess.Popen(
                    [PROGRAM, self.name],
                    env=env,
                    pass_fds=(tun, listener.fileno()),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the agent and its process group's signals
                )
        except OSError as e:
            raise BackendError(
                f"cannot start {PROGRAM} for {self.name} ({e.strerror}); check that it is "
                f"installed and {self.run_dir} is writable"
            ) from None
        finally:
            os.close(tun)
            listener.close()
        self.starts += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not await self._serves():
            if self.proc.poll() is not None or loop.time() > deadline:
                tail = (self.run_dir / f"{PROGRAM}.log").read_text(errors="replace")[-300:]
                raise BackendError(
                    f"{PROGRAM} for {self.name} did not come up (status {self.proc.poll()}); "
                    f"its log {self.run_dir / (PROGRAM + '.log')} ends: {tail.strip()!r}"
                )
            await asyncio.sleep(0.05)
        log.info("wireguard: started %s (pid %d) on %s", PROGRAM, self.proc.pid, self.socket_path)

    async def _serves(self) -> bool:
        """wireguard-go answers a request (a connection alone is taken by the backlog of the
        socket the agent made, before wireguard-go accepts anything)."""
        try:
            await self.get()
        except UapiError:
            return False
        return True

    async def close(self) -> None:
        """Nothing to release: the child keeps the device running for the next agent."""
