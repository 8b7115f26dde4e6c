"""A TCP proxy that makes a link look like a WAN: it delays every chunk by a fixed
one-way latency in each direction, and can stall a chunk now and then to mimic the
retransmission timeouts that packet loss causes (a user-space proxy sees a reliable
byte stream, so it cannot drop bytes without corrupting it).

Bandwidth limits are the kernel's job (`tc qdisc ... tbf` on the veth); this proxy adds
what `tc netem` would have added. Run it as a process:

    python -m standby.testing.wanproxy --listen 10.0.0.2:9000 --target 127.0.0.1:7443 \
        --delay-ms 50 [--stall-probability 0.001 --stall-ms 200]

Memory is bounded: each direction holds at most --buffer bytes in flight before it
stops reading (the sender then sees back-pressure, as on a real full link).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from collections import deque


class _Pipe:
    """One direction: read, hold each chunk until its release time, write in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                 stall_probability: float, stall: float, buffer: int, rng: random.Random) -> None:
        self.reader, self.writer = reader, writer
        self.delay, self.stall_probability, self.stall = delay, stall_probability, stall
        self.buffer, self.rng = buffer, rng
        self.queue: deque[tuple[float, bytes]] = deque()
        self.held = 0
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.eof = False

    async def read_loop(self) -> None:
        try:
            while True:
                await self.room.wait()
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                release = time.monotonic() + self.delay
                if self.stall_probability and self.rng.random() < self.stall_probability:
                    release += self.stall
                self.queue.append((release, chunk))
                self.held += len(chunk)
                if self.held >= self.buffer:
                    self.room.clear()
                self.ready.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            self.ready.set()

    async def write_loop(self) -> None:
        try:
            while True:
                if not self.queue:
                    if self.eof:
                        break
                    self.ready.clear()
                    await self.ready.wait()
                    continue
                release, chunk = self.queue[0]
                wait = release - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                # A later chunk never overtakes an earlier one (stalls delay the rest too).
                self.queue.popleft()
                self.held -= len(chunk)
                if self.held < self.buffer:
                    self.room.set()
                self.writer.write(chunk)
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
            except (ConnectionError, OSError):
                pass


class WanProxy:
    def __init__(self, target: tuple[str, int], delay_ms: float, stall_probability: float = 0.0,
                 stall_ms: float = 200.0, buffer: int = 32 * 1024 * 1024, seed: int | None = None) -> None:
        self.target = target
        self.delay = delay_ms / 1000
        self.stall_probability = stall_probability
        self.stall = stall_ms / 1000
        self.buffer = buffer
        self.rng = random.Random(seed)

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        pipes = [_Pipe(client_r, server_w, self.delay, self.stall_probability, self.stall, self.buffer, self.rng),
                 _Pipe(server_r, client_w, self.delay, self.stall_probability, self.stall, self.buffer, self.rng)]
        await asyncio.gather(*(p.read_loop() for p in pipes), *(p.write_loop() for p in pipes))
        for w in (client_w, server_w):
            w.close()

    async def serve(self, host: str, port: int, started: asyncio.Event | None = None) -> None:
        server = await asyncio.start_server(self.handle, host, port, reuse_address=True)
        if started is not None:
            started.set()
        async with server:
            await server.serve_forever()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, default=50.0, help="one-way latency added in each direction")
    ap.add_argument("--stall-probability", type=float, default=0.0, help="chance a chunk is held back extra")
    ap.add_argument("--stall-ms", type=float, default=200.0, help="how long a stalled chunk is held back")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    proxy = WanProxy(_hostport(args.target), args.delay_ms, args.stall_probability, args.stall_ms, seed=args.seed)
    loop = asyncio.new_event_loop()
    task = loop.create_task(proxy.serve(*_hostport(args.listen)))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()


if __name__ == "__main__":
    main()
