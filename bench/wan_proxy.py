"""A TCP proxy that makes a loopback upstream look like one across a WAN: every byte arrives
`--latency` seconds after it was sent (each direction, so a round trip costs twice that), and each
connection carries at most `--rate` bytes per second each way (a per-connection cap, like a long fat
pipe with TCP's window the limit, or a CDN's per-connection shaping). Memory per connection is
bounded: a full delay line stops reading, and TCP pushes back on the sender.

    python bench/wan_proxy.py --listen 127.0.0.1:6000 --to 127.0.0.1:5000 --latency 0.02 --rate 4M
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgecache.sizes import parse_size

CHUNK = 16 * 1024


async def carry(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency: float, rate: float
) -> None:
    """Copy one direction: each chunk leaves `latency` after it came in, paced to `rate`."""
    loop = asyncio.get_running_loop()
    in_flight = max(4, int(rate * latency / CHUNK) + 4) if rate else 64
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=in_flight)

    async def receive() -> None:
        while data := await reader.read(CHUNK):
            await line.put((loop.time() + latency, data))
        await line.put((loop.time() + latency, b""))

    receiving = asyncio.create_task(receive())
    free_at = loop.time()
    try:
        while True:
            due, data = await line.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            if rate:
                free_at = max(free_at, loop.time())
                if (wait := free_at - loop.time()) > 0:
                    await asyncio.sleep(wait)
                free_at += len(data) / rate
            writer.write(data)
            await writer.drain()
    finally:
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await receiving


async def serve(listen: str, to: str, latency: float, rate: float) -> None:
    target_host, target_port = to.rsplit(":", 1)

    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(latency)  # the SYN's way there (the handshake costs a round trip)
        try:
            up_r, up_w = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_w.close()
            return
        await asyncio.sleep(latency)  # ... and the SYN-ACK's way back
        directions = [carry(client_r, up_w, latency, rate), carry(up_r, client_w, latency, rate)]
        tasks = [asyncio.create_task(direction) for direction in directions]
        # Both run to their EOFs (a half-close is normal); one failing (a reset) ends the other.
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (up_w, client_w):
            writer.close()

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(connection, host, int(port))
    async with server:
        await server.serve_forever()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--latency", type=float, default=0.02, help="one-way delay in seconds")
    parser.add_argument("--rate", default="4M", help="bytes per second per connection and direction")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.to, args.latency, float(parse_size(args.rate, "--rate"))))


if __name__ == "__main__":
    main()
