"""The receive state machine of the udp datapath, without I/O: what each UDP receive becomes
(TUN writes, drops counted) and where the next receive goes. The datapath only feeds it.

Theory of operation. With offloads one receive returns a GRO batch: equal-sized datagrams of
one sender, the last perhaps shorter. What the batch becomes depends on the machine's state
and on where its first train datagram lies (a first byte whose high nibble is 15,
`trains.IS_TRAIN`: no IPv4 packet starts so), and is read off `PATHS`:

    state \\ first train datagram   none                 first              k-th, k > 0
    READY                          PACKETS, LAYOUT      TRAINS             PACKETS, CLOSE, TRAINS
    OPEN                           PACKETS, CLOSE       CLOSE, TRAINS      PACKETS, CLOSE, TRAINS

- PACKETS: the datagrams before the first train datagram, validated and joined into runs
  (`runs.receive`, or `runs.receive_scattered` when they came into a `Scatter`); in OPEN the
  open run goes on if they come from its sender, and is written first if not.
- CLOSE: the open run is written (trains never continue one).
- TRAINS: the datagrams from the first train datagram on: admitted or all dropped
  (`trains.admit`) before any buffer is laid out for them, then reassembled (`trains.Trains`),
  laid out where they came when they came into the train layout, else copied into it; what
  follows the trains goes through `runs.receive`, its run written.
- LAYOUT: the next receive laid out for what this one held: after a batch, into the first of
  a pair of `Scatter`s for its segments (switched when a run of another (hl, mss) came in
  full-size datagrams), after a single datagram (an ACK, say) into the flat buffer.

TRAINS lays the next receive out for trains too: after a batch of them, the train layout.

    state   event                               writes                  next state
    READY   receive, a run left open at its end  the receive's           OPEN
    READY   receive (no run left open)           the receive's           READY
    OPEN    receive                              the receive's, the run  READY
    any     nothing, truncated                   the open run, if any    READY
    any     reset                                none (the run dropped)  READY, flat layout

In OPEN the burst's next send (a super-packet cut into two UDP_SEGMENT sends) may be waiting
already: the datapath receives once more without waiting, into `iov` (the pair's second
`Scatter`, so the run's payload in the first stays put), and reports what came (`receive`),
that nothing did (`nothing`) or that it was cut (`truncated`). A write's buffers stay valid
until the next event: nothing is laid over a buffer that a write of the same event uses.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

from .core import Drop, Routes
from .ipv4 import Buf
from .layouts import KEPT, LAYOUT_MIN_MSS, Scatter, kept
from .runs import Run, Writes, receive, receive_scattered
from .trains import IS_TRAIN, TAG_LEN, Trains, admit

READY: Final = "READY"  # the next receive is a fresh one
OPEN: Final = "OPEN"  # a run is open: the next receive looks for its continuation

PACKETS: Final = "PACKETS"
CLOSE: Final = "CLOSE"
TRAINS: Final = "TRAINS"
LAYOUT: Final = "LAYOUT"

# the steps of a receive, by state, then by where its first train datagram lies: none, the
# first datagram, a later one (`NONE`, `FIRST`, `LATER`)
NONE, FIRST, LATER = 0, 1, 2
PATHS: Final[dict[str, tuple[tuple[str, ...], ...]]] = {
    READY: ((PACKETS, LAYOUT), (TRAINS,), (PACKETS, CLOSE, TRAINS)),
    OPEN: ((PACKETS, CLOSE), (CLOSE, TRAINS), (PACKETS, CLOSE, TRAINS)),
}

FIRST_HL = 52  # the first layout: TCP with timestamps (52 header bytes) at the TUN MTU


class Receiver:
    """The receive state machine (see the module doc) over its receive buffers: `buf` (flat,
    `flat` its iov) and pairs of `Scatter`s, a few kept; `iov` is where the next receive goes.
    Drops are counted in `drops`; `mtu` is the TUN device's."""

    def __init__(self, mtu: int, drops: Counter[Drop], buf: bytearray) -> None:
        self.drops = drops
        self.buf = buf
        self.flat: list[Buf] = [buf]
        self.trains = Trains(mtu)
        self.state: str = READY
        self.run: Run | None = None  # open in OPEN
        self._run_src: tuple[str, int] | None = None  # its sender
        self._scatters: dict[tuple[int, int], tuple[Scatter, Scatter]] = {}
        self._pair = self._scatter_pair(FIRST_HL, max(mtu - FIRST_HL, 4))
        self._fresh: Scatter | None = None  # where the next fresh receive goes (None: flat)
        self._second = self._pair[1]  # where the continuation goes, in OPEN
        self.iov: list[Buf] = self.flat

    def _scatter_pair(self, hl: int, mss: int) -> tuple[Scatter, Scatter]:
        return kept(self._scatters, (hl, mss), lambda: (Scatter(hl, mss), Scatter(hl, mss)), KEPT)

    # -- events --------------------------------------------------------------------------------
    def receive(self, routes: Routes, n: int, gro: int, src: tuple[str, int]) -> Writes:
        """n bytes came into `iov` from `src`, as `gro`-byte datagrams (the last may be
        shorter); the TUN writes they become, in order."""
        state = self.state
        landed = self._fresh if state is READY else self._second
        ip, port = src
        if n <= 0 or gro <= 0:
            at = -1
        elif n <= gro:  # one datagram (an ACK, say): its first byte, wherever it came
            at = 0 if IS_TRAIN[self.buf[0] if landed is None else landed.heads[0]] else -1
        elif landed is None:
            at = self.buf[0:n:gro].translate(IS_TRAIN).find(1)
        elif landed.seg == gro:
            at = landed.heads[0 : -(-n // gro) * landed.hl : landed.hl].translate(IS_TRAIN).find(1)
        else:
            at = landed.flat(0, n)[0:n:gro].translate(IS_TRAIN).find(1)
        plain = n if at < 0 else at * gro  # the bytes before the first train datagram
        writes: Writes = []
        run = self.run
        second = self._pair[1]
        for step in PATHS[state][NONE if at < 0 else FIRST if at == 0 else LATER]:
            if step is PACKETS:
                if run is not None and src != self._run_src:
                    writes.append(run.write())
                    run = None
                if landed is None:
                    more, run = receive(routes, ip, port, self.buf, plain, gro, self.drops)
                else:
                    more, run = receive_scattered(
                        routes, ip, port, landed, plain, gro, self.drops, run
                    )
                writes += more
            elif step is CLOSE:
                if run is not None:
                    writes.append(run.write())
                    run = None
            elif step is TRAINS:
                writes += self._trains(routes, src, landed, n, plain, gro, state is READY)
            else:  # LAYOUT
                self._layout(run, n, gro)
        self._settle(run, src, second)
        return writes

    def datagram(self, routes: Routes, n: int, src: tuple[str, int]) -> Writes:
        """`receive` of one datagram (no GRO batch) that came into the flat buffer in READY
        (the caller checked both: `iov is flat`), the common case at low load (a ping, a
        request, an ACK): the same steps (PACKETS, LAYOUT, or TRAINS for a train's chunk),
        without looking them up; a datagram after a sleep pays for every line it runs."""
        if n > 0 and IS_TRAIN[self.buf[0]]:
            return self.receive(routes, n, n, src)
        second = self._pair[1]
        writes, run = receive(routes, src[0], src[1], self.buf, n, n, self.drops)
        if run is not None:
            self._layout(run, n, n)
        self._settle(run, src, second)
        return writes

    def _layout(self, run: Run | None, n: int, gro: int) -> None:
        """LAYOUT: the next fresh receive laid out for what this one held (module doc)."""
        first = self._pair[0]
        if (
            run is not None
            and (run.hl, run.mss) != (first.hl, first.mss)
            and run.dlen == gro
            and run.mss >= LAYOUT_MIN_MSS
        ):
            self._pair = self._scatter_pair(run.hl, run.mss)
        self._fresh = self._pair[0] if n > gro else None

    def _settle(self, run: Run | None, src: tuple[str, int], second: Scatter) -> None:
        """The state after a receive: OPEN with `run` (continued into `second`), or READY."""
        self.run = run
        if run is None:
            self.state = READY
            self.iov = self._fresh.iov if self._fresh is not None else self.flat
        else:  # only READY's PACKETS, LAYOUT leaves a run open
            self.state, self._run_src, self._second = OPEN, src, second
            self.iov = second.iov

    def nothing(self) -> Writes:
        """No receive came where one was looked for (in OPEN: the run ends here)."""
        run, self.run = self.run, None
        self.state = READY
        self.iov = self._fresh.iov if self._fresh is not None else self.flat
        return [run.write()] if run is not None else []

    def truncated(self) -> Writes:
        """A receive was larger than its buffers: dropped, and as `nothing`."""
        self.drops[Drop.TRUNCATED] += 1
        return self.nothing()

    def reset(self) -> None:
        """Start afresh after a bug met while handling a receive: the open run dropped, the
        next receive into the flat buffer."""
        self.run, self._fresh = None, None
        self.state, self.iov = READY, self.flat

    # -- steps ---------------------------------------------------------------------------------
    def _trains(
        self,
        routes: Routes,
        src: tuple[str, int],
        landed: Scatter | None,
        n: int,
        plain: int,
        gro: int,
        fresh: bool,
    ) -> Writes:
        """TRAINS for bytes plain..n of the receive that came into `landed` (None: the flat
        buffer); taken where they lie when a `fresh` receive starts with them in the train
        layout."""
        writes: Writes = []
        ip, port = src
        tn = n - plain
        peer = admit(routes, ip, port, tn, gro)
        if isinstance(peer, Drop):  # decided before any buffer is laid out for them
            self.drops[peer] += -(-tn // gro)
            self._fresh = None
            return writes
        if (
            fresh
            and not plain
            and landed is not None
            and landed.hl == TAG_LEN
            and landed.seg == gro
        ):
            sc = landed
        else:
            data = self.buf[plain:n] if landed is None else landed.flat(plain, n)
            if tn <= gro:  # one datagram (a train's short last chunk, say): a layout of its own
                sc = Scatter(TAG_LEN, tn - TAG_LEN, tn)
            else:
                self._pair = self._scatter_pair(TAG_LEN, gro - TAG_LEN)
                sc = self._pair[0]
            sc.load(data)  # as a receive into the train layout would have put it
        self._fresh = self._pair[0] if tn > gro else None
        got, used = self.trains.take(routes, ip, sc, tn, gro, self.drops)
        writes += got
        if used * gro < tn:  # not trains from there on
            more, run = receive(
                routes, ip, port, sc.flat(used * gro, tn), tn - used * gro, gro, self.drops
            )
            writes += more
            if run is not None:
                writes.append(run.write())
        return writes
