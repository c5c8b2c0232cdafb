"""`make bench`: N simultaneous full-duplex calls through a real bridge process.

The bridge runs as its own process (`python -m server`), so its CPU and memory are its own. This
process plays both peers: Twilio (every call sends a 20 ms frame every 20 ms and echoes marks)
and OpenAI (the stand-in streams a 20 ms frame every 20 ms back to every call). Every frame
carries its send time (CLOCK_MONOTONIC, one clock for the whole machine), so relay latency is
measured in each direction. Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from server.testing.simulator import TwilioStream
from server.testing.standin import STANDIN_SESSIONS, StandinOptions, create_standin_app
from server.twilio_protocol import compute_signature

STAMP = struct.Struct("<d")
FILL = bytes([0xFF]) * (160 - STAMP.size)
AUTH_TOKEN = "bench-auth-token"
ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Direction:
    """Frames one way: how many were sent and arrived, and relay latency while measuring."""

    name: str
    sent: int = 0
    received: int = 0
    in_window: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    measuring: bool = False

    def frame(self) -> bytes:
        self.sent += 1
        return STAMP.pack(time.monotonic()) + FILL

    def arrived(self, audio: bytes) -> None:
        self.received += 1
        if self.measuring:
            self.in_window += 1
            self.latencies_ms.append((time.monotonic() - STAMP.unpack_from(audio)[0]) * 1000)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float:
            return round(lat[min(int(len(lat) * p), len(lat) - 1)], 2) if lat else float("nan")

        return {"frames_sent": self.sent, "frames_received": self.received,
                "frames_lost": self.sent - self.received, "p50_ms": pct(0.50),
                "p99_ms": pct(0.99), "max_ms": round(lat[-1], 2) if lat else float("nan"),
                "samples": len(lat)}


def _proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _start_bridge(standin_port: int, port: int) -> asyncio.subprocess.Process:
    env = {**os.environ, "OPENAI_API_KEY": "bench-key", "HOST": "127.0.0.1", "PORT": str(port),
           "OPENAI_REALTIME_URL": f"ws://127.0.0.1:{standin_port}/v1/realtime",
           "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "LOG_LEVEL": "WARNING",
           "INSTRUCTIONS": "bench {{call_sid}}", "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "server", env=env,
                                                cwd=ROOT, stdout=asyncio.subprocess.DEVNULL)
    async with aiohttp.ClientSession() as http:
        for _ in range(500):
            try:
                async with http.get(f"http://127.0.0.1:{port}/") as resp:
                    if resp.status == 200:
                        return proc
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
    proc.kill()
    raise RuntimeError("the bridge did not start")


async def _place(http: aiohttp.ClientSession, base: str, n: int, down: Direction,
                 started: dict[str, float]) -> TwilioStream:
    call_sid = f"CA{n:032x}"
    form = {"CallSid": call_sid, "From": "+15550000000", "To": "+15551111111"}
    url = f"{base}/incoming-call"
    started[call_sid] = asyncio.get_running_loop().time()
    headers = {"X-Twilio-Signature": compute_signature(AUTH_TOKEN, url, form)}
    async with http.post(url, data=form, headers=headers) as resp:
        twiml = await resp.text()
    stream_url = twiml.split('<Stream url="', 1)[1].split('"', 1)[0]
    token = twiml.split('name="token" value="', 1)[1].split('"', 1)[0]

    def listener(message: dict[str, Any]) -> None:
        if message.get("event") == "media":
            down.arrived(base64.b64decode(message["media"]["payload"]))

    stream = await TwilioStream.connect(http, stream_url, marks="immediate", listener=listener)
    await stream.send_connected()
    await stream.send_start(call_sid, f"MZ{n:032x}", {"token": token})
    return stream


async def run(calls: int, seconds: float, warmup: float = 1.0) -> dict[str, Any]:
    up, down = Direction("caller->model"), Direction("model->caller")
    standin_app = create_standin_app(StandinOptions(reply="stream", stream_frame=down.frame,
                                                    on_audio=up.arrived))
    runner = web.AppRunner(standin_app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    standin_port = runner.addresses[0][1]
    port = _free_port()
    bridge = await _start_bridge(standin_port, port)
    loop = asyncio.get_running_loop()
    rss_idle = _proc_kib(bridge.pid, "VmRSS")
    started: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            streams = []
            for n in range(calls):  # a 5 ms ramp between calls, as calls really arrive
                streams.append(await _place(http, f"http://127.0.0.1:{port}", n, down, started))
                await asyncio.sleep(0.005)
            sessions = standin_app[STANDIN_SESSIONS]
            while len(sessions) < calls or any(s.updated_at is None for s in sessions):
                await asyncio.sleep(0.01)
            setup_ms = sorted((s.updated_at - started[s.session["instructions"].split()[1]])
                              * 1000 for s in sessions if s.updated_at is not None)

            lateness: list[float] = []

            async def caller_clock() -> None:
                due = loop.time()
                while True:
                    for stream in streams:
                        await stream.send_media(up.frame())
                    due += 0.02
                    lateness.append(max(loop.time() - due, 0) * 1000)
                    await asyncio.sleep(max(due - loop.time(), 0))

            clock = loop.create_task(caller_clock())
            await asyncio.sleep(warmup)
            up.measuring = down.measuring = True
            cpu0, wall0 = _proc_cpu_seconds(bridge.pid), loop.time()
            own0 = resource.getrusage(resource.RUSAGE_SELF)
            await asyncio.sleep(seconds)
            cpu1, wall1 = _proc_cpu_seconds(bridge.pid), loop.time()
            own1 = resource.getrusage(resource.RUSAGE_SELF)
            up.measuring = down.measuring = False
            rss_loaded = _proc_kib(bridge.pid, "VmRSS")
            clock.cancel()
            await asyncio.gather(clock, return_exceptions=True)
            for session in sessions:
                await session.stop_streaming()
            for _ in range(100):  # let frames in flight land (bounded)
                if up.received >= up.sent and down.received >= down.sent:
                    break
                await asyncio.sleep(0.02)
            rss_peak = _proc_kib(bridge.pid, "VmHWM")
            for stream in streams:
                await stream.send_stop()
            for stream in streams:
                await stream.close()
    finally:
        bridge.terminate()
        await bridge.wait()
        await runner.cleanup()
    relayed = up.in_window + down.in_window
    cpu = cpu1 - cpu0
    own_cpu = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    lateness.sort()
    return {
        "calls": calls, "seconds": round(wall1 - wall0, 2),
        "caller_to_model": up.summary(), "model_to_caller": down.summary(),
        "bridge_cpu_percent_of_one_core": round(cpu / (wall1 - wall0) * 100, 1),
        "bridge_cpu_us_per_relayed_frame": round(cpu * 1e6 / relayed, 1) if relayed else None,
        "relayed_frames_per_second": round(relayed / (wall1 - wall0)),
        "bridge_rss_idle_mib": round(rss_idle / 1024, 1),
        "bridge_rss_loaded_mib": round(rss_loaded / 1024, 1),
        "bridge_rss_peak_mib": round(rss_peak / 1024, 1),
        "bridge_rss_per_call_kib": round((rss_loaded - rss_idle) / calls, 1),
        "setup_ms": {"p50": round(setup_ms[len(setup_ms) // 2], 1),
                     "max": round(setup_ms[-1], 1)},
        "load_generator_cpu_percent_of_one_core": round(own_cpu / (wall1 - wall0) * 100, 1),
        "load_generator_clock_lateness_ms": {
            "p99": round(lateness[int(len(lateness) * 0.99)], 2) if lateness else 0.0,
            "max": round(lateness[-1], 2) if lateness else 0.0},
    }


def table(r: dict[str, Any]) -> str:
    rows = [("calls", r["calls"]), ("measured for", f"{r['seconds']} s")]
    for key, label in (("caller_to_model", "caller->model"), ("model_to_caller",
                                                                "model->caller")):
        d = r[key]
        rows.append((f"{label} latency p50/p99/max",
                     f"{d['p50_ms']} / {d['p99_ms']} / {d['max_ms']} ms"))
        rows.append((f"{label} frames sent/lost", f"{d['frames_sent']} / {d['frames_lost']}"))
    rows += [
        ("relayed frames per second", r["relayed_frames_per_second"]),
        ("bridge CPU per relayed frame", f"{r['bridge_cpu_us_per_relayed_frame']} us"),
        ("bridge CPU", f"{r['bridge_cpu_percent_of_one_core']} % of one core"),
        ("bridge RSS idle/loaded/peak", f"{r['bridge_rss_idle_mib']} / "
         f"{r['bridge_rss_loaded_mib']} / {r['bridge_rss_peak_mib']} MiB"),
        ("bridge RSS per call", f"{r['bridge_rss_per_call_kib']} KiB"),
        ("call setup (webhook -> session.updated)",
         f"p50 {r['setup_ms']['p50']} ms, max {r['setup_ms']['max']} ms"),
        ("load generator CPU", f"{r['load_generator_cpu_percent_of_one_core']} % of one core"),
        ("load generator clock lateness p99/max",
         f"{r['load_generator_clock_lateness_ms']['p99']} / "
         f"{r['load_generator_clock_lateness_ms']['max']} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.bench", description=__doc__)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=Path("out/bench.json"))
    args = parser.parse_args(argv)
    print(f"bench: {args.calls} simultaneous calls, full duplex, {args.seconds:g} s measured")
    result = asyncio.run(run(args.calls, args.seconds))
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
