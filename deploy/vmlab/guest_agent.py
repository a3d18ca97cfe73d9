"""The VM lab's guest agent: runs inside every VM (installed into the image as
/usr/local/sbin/vmlab-agent, started by vmlab-agent.service) and executes the host's shell
commands arriving on the virtio-serial port `vmlab.agent`; no network is involved.

One JSON object per line each way. Host -> guest: {"id": 7, "sh": "systemctl is-active
flanneld", "timeout": 30}. Guest -> host: {"id": 7, "rc": 0, "out": "...", "err": "..."}
(rc -1 and err "timeout" when the command ran out of time). On start the agent announces
itself with {"hello": "<boot id>"}, so the host tells a rebooted VM from the one before.
Commands run one at a time; a command that starts something long-running must detach it
(setsid ... </dev/null >file 2>&1 &). Standard library only: it runs on Debian's python3.
"""

import json
import os
import subprocess
import sys
import time

PORT = "/dev/virtio-ports/vmlab.agent"
LIMIT = 256 * 1024  # bytes of stdout/stderr returned per command


def run(request: dict) -> dict:
    reply = {"id": request.get("id")}
    try:
        res = subprocess.run(
            ["/bin/bash", "-c", request["sh"]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=float(request.get("timeout", 60)),
        )
        reply.update(rc=res.returncode, out=res.stdout[-LIMIT:].decode(errors="replace"))
        reply["err"] = res.stderr[-LIMIT:].decode(errors="replace")
    except subprocess.TimeoutExpired:
        reply.update(rc=-1, out="", err="timeout")
    except Exception as e:  # a bad request must not end the agent
        reply.update(rc=-2, out="", err=f"agent: {e!r}")
    return reply


def main() -> int:
    while not os.path.exists(PORT):
        time.sleep(0.2)
    fd = os.open(PORT, os.O_RDWR)
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()

    def send(obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(fd, data) :]

    send({"hello": boot_id})
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:  # the host is not connected: wait for it
            time.sleep(0.2)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except ValueError:
                send({"id": None, "rc": -2, "out": "", "err": "agent: not JSON"})
                continue
            if request.get("hello"):
                send({"hello": boot_id})
                continue
            send(run(request))


if __name__ == "__main__":
    sys.exit(main())
