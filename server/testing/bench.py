"""`make bench`: the full bridge against a bare relay, under the same load, in one run.

    python -m server.testing.bench [--calls 100] [--seconds 20] [--rounds 2]
        [--bridge-env RECORD_CALLS=on ...] [--compare RECORD_CALLS=off,on]

N simultaneous full-duplex calls, each a 20 ms frame every 20 ms each way, go through a real
server process: the bridge (`python -m server`) or the bare relay
(`python -m server.testing.bare_relay`: parse, re-wrap, send, nothing else). Runs alternate,
bridge then bare relay, `--rounds` times, on the same machine and load generator, and the
bridge's CPU per relayed frame is printed as a ratio to the bare relay's: what the bridge's
features cost, with the machine, Python and load taken out.

The load generator is separate processes (`server.testing.loadgen`), one per 150 calls on
each side unless `--callers` / `--standins` say otherwise: caller processes play Twilio (the
webhook and stream through `server.testing.dial`, then a lean WebSocket client sending a frame
every 20 ms per call, the calls' phases spread over the 20 ms, and echoing marks as they come,
however many there are), and stand-in processes play OpenAI (the stand-in in stream mode,
keeping nothing per frame, sharing one port). Every frame carries its send time
(CLOCK_MONOTONIC), so relay latency is measured in each direction on arrival. The generator's
CPU per process and clock lateness, and the whole machine's load, are printed too, with a
warning when they mean the numbers are the machine's or the generator's, not the server's (on
2 cores, 300 calls need about as much CPU for the generator as for the server).

Per configuration it prints: relay latency p50/p99/max each way, frames sent and lost, CPU per
relayed frame (a frame is 20 ms of audio: GPT-Live's 100 ms deltas count as five) and share of
one core (from /proc/<pid>/stat, the server's process tree), RSS
idle/loaded/peak and per call, call set-up time (webhook posted -> the model's first audio
sent, i.e. session.updated), and marks echoed per second (however the bridge paces them).
Everything, per run, goes to out/bench.json.

A/B of two bridge configurations in one run: `--compare NAME=A,B` runs the bridge twice per
round, with NAME=A and with NAME=B (an environment variable, e.g. `--compare
RECORD_CALLS=off,on`, or `--compare MODEL_API=realtime,live` for the two OpenAI APIs: the
stand-in processes play both), beside the bare relay, and prints each with its ratio.
`--bridge-env NAME=VALUE` (repeatable) sets a variable for every bridge run. The bench sets the
bridge's OPENAI_* (both APIs' URLs), HOST, PORT, PUBLIC_URL, TWILIO_AUTH_TOKEN,
LOG_LEVEL=WARNING, MAX_CALLS=0 and INSTRUCTIONS; anything else comes from the environment (and
.env) as for `make run`. Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from server.testing.loadgen import PERIOD, Histogram
from server.testing.process import free_port, loop_name, server_process

AUTH_TOKEN = "bench-auth-token"  # not a secret: both ends are on this machine
ROOT = Path(__file__).resolve().parent.parent.parent
SOURCE_VARIABLE = "BRIDGE_SOURCE"
RAMP = 0.005  # seconds between two calls' webhooks, as calls really arrive
BRIDGE, BARE = "server", "server.testing.bare_relay"
CALLS_PER_PROCESS = 150  # load generator processes per side: each stays well below a core
FRAME_LATE_MS = 20.0  # a generator clock later than one frame (p99) skews the latencies


@dataclass(frozen=True)
class Config:
    """One server set-up to measure: which module, with which extra environment."""

    label: str
    module: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def is_bare(self) -> bool:
        return self.module == BARE

    @property
    def source(self) -> Path:
        """Which checkout's server to run: BRIDGE_SOURCE (e.g. `--compare
        BRIDGE_SOURCE=/path/to/an/older/checkout,.` to measure a change), else this one."""
        return Path(self.env.get(SOURCE_VARIABLE) or ROOT).resolve()


def configs(bridge_env: dict[str, str] | None = None,
            compare: tuple[str, list[str]] | None = None) -> list[Config]:
    """The bridge (or its two `compare` variants) and the bare relay, in run order."""
    base = dict(bridge_env or {})
    if compare is None:
        bridges = [Config("bridge", BRIDGE, base)]
    else:
        name, values = compare
        bridges = [Config(f"bridge {name}={v}", BRIDGE, {**base, name: v}) for v in values]
    return [*bridges, Config("bare relay", BARE)]


# --- /proc ---


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree(pid: int) -> list[int]:
    """The process and its descendants (the bridge with WORKERS > 1 forks its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError):
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in tree(pid))


def tree_kib(pid: int, key: str) -> int:
    return sum(status_kib(p, key) for p in tree(pid))


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    model = "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_generator_loop": loop_name(), "platform": platform.platform()}


# --- the load generator's processes ---


class Worker:
    """One load generator process, driven over its stdin/stdout (see loadgen)."""

    def __init__(self, role: str, proc: asyncio.subprocess.Process) -> None:
        self.role = role
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, role: str, *args: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.testing.loadgen", role, *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
        worker = cls(role, proc)
        await worker._read(30.0)  # {"ready": true}
        return worker

    async def ask(self, cmd: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps({"cmd": cmd, **fields}) + b"\n")
        await self.proc.stdin.drain()
        return await self._read(timeout)

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"the {self.role} process exited "
                               f"(status {await self.proc.wait()}); see its stderr above")
        reply: dict[str, Any] = orjson.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.role} process failed: {reply['error']}")
        return reply

    async def close(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            with suppress(ConnectionError):
                self.proc.stdin.write(b'{"cmd": "exit"}\n')
                self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5.0)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class LoadGenerator:
    callers: list[Worker]
    standins: list[Worker]
    standin_port: int

    @property
    def workers(self) -> list[Worker]:
        return [*self.callers, *self.standins]


@asynccontextmanager
async def load_generator(callers: int, standins: int) -> AsyncIterator[LoadGenerator]:
    port = free_port()
    async with AsyncExitStack() as stack:
        started = await asyncio.gather(
            *(Worker.start("callers") for _ in range(callers)),
            *(Worker.start("standin", str(port)) for _ in range(standins)),
            return_exceptions=True)
        for worker in started:
            if isinstance(worker, Worker):
                stack.push_async_callback(worker.close)
        for worker in started:
            if isinstance(worker, BaseException):
                raise worker
        workers = [w for w in started if isinstance(w, Worker)]
        yield LoadGenerator(workers[:callers], workers[callers:], port)


async def _all(workers: Iterable[Worker], cmd: str, **fields: Any) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(w.ask(cmd, **fields) for w in workers)))


# --- one run ---


@dataclass
class Run:
    """One configuration measured once: the raw numbers (the JSON has them all)."""

    config: Config
    round: int
    calls: int
    wall: float  # seconds measured
    server_cpu: float  # CPU seconds the server used while measured
    up: dict[str, int]  # caller -> model frames: sent, received
    down: dict[str, int]
    up_latency: Histogram
    down_latency: Histogram
    setup_ms: list[float]
    rss_kib: dict[str, int]  # idle, loaded, peak
    generator: list[dict[str, Any]]  # per process: role, cpu_percent
    caller_lateness: Histogram
    standin_lateness: Histogram
    marks_echoed: int
    errors: dict[str, int]
    server_log: list[str]  # warnings and errors the server logged
    others_cpu: float  # CPU seconds the rest of the machine used while measured
    machine_cpu: float  # CPU seconds the whole machine used while measured (all cores)

    @property
    def relayed(self) -> int:
        return self.up_latency.count + self.down_latency.count

    def summary(self) -> dict[str, Any]:
        return _summary([self])


def _direction(runs: list[Run], key: str) -> dict[str, Any]:
    counts = [getattr(r, key) for r in runs]
    sent, received = sum(c["sent"] for c in counts), sum(c["received"] for c in counts)
    h = Histogram.merged(getattr(r, key + "_latency") for r in runs)
    return {"frames_sent": sent, "frames_received": received, "frames_lost": sent - received,
            "p50_ms": h.percentile(0.50), "p99_ms": h.percentile(0.99),
            "max_ms": round(h.max_ms, 2) if h.count else None, "samples": h.count}


def _pct(values: list[float], p: float) -> float | None:
    values = sorted(values)
    return round(values[min(int(len(values) * p), len(values) - 1)], 2) if values else None


def _summary(runs: list[Run]) -> dict[str, Any]:
    """One configuration over all its runs: frames and CPU summed, latencies merged."""
    wall = sum(r.wall for r in runs)
    cpu = sum(r.server_cpu for r in runs)
    relayed = sum(r.relayed for r in runs)
    calls = runs[0].calls
    setup = [ms for r in runs for ms in r.setup_ms]
    gen_cpu = [p["cpu_percent_of_one_core"] for r in runs for p in r.generator]
    gen_total = [sum(p["cpu_percent_of_one_core"] for p in r.generator) for r in runs]
    caller_late = Histogram.merged(r.caller_lateness for r in runs)
    standin_late = Histogram.merged(r.standin_lateness for r in runs)
    errors: dict[str, int] = {}
    for r in runs:
        for why, n in r.errors.items():
            errors[why] = errors.get(why, 0) + n
    return {
        "runs": len(runs), "calls": calls, "seconds": round(wall, 2),
        "caller_to_model": _direction(runs, "up"), "model_to_caller": _direction(runs, "down"),
        "cpu_us_per_relayed_frame": round(cpu * 1e6 / relayed, 2) if relayed else None,
        "cpu_us_per_relayed_frame_per_run": [
            round(r.server_cpu * 1e6 / r.relayed, 2) if r.relayed else None for r in runs],
        "cpu_percent_of_one_core": round(cpu / wall * 100, 1) if wall else None,
        "relayed_frames_per_second": round(relayed / wall) if wall else 0,
        "rss_idle_mib": round(statistics.mean(r.rss_kib["idle"] for r in runs) / 1024, 1),
        "rss_loaded_mib": round(statistics.mean(r.rss_kib["loaded"] for r in runs) / 1024, 1),
        "rss_peak_mib": round(max(r.rss_kib["peak"] for r in runs) / 1024, 1),
        "rss_per_call_kib": round(statistics.mean(
            (r.rss_kib["loaded"] - r.rss_kib["idle"]) / calls for r in runs), 1),
        "setup_ms": {"p50": _pct(setup, 0.5), "max": _pct(setup, 1.0)},
        "marks_echoed_per_second": round(sum(r.marks_echoed for r in runs) / wall)
        if wall else 0,
        "errors": errors,
        "server_log_problems": sum(len(r.server_log) for r in runs),
        "other_processes_cpu_percent_of_one_core": round(
            max(r.others_cpu / r.wall * 100 for r in runs), 1),
        "machine_busy_percent": round(
            max(r.machine_cpu / r.wall * 100 / (os.cpu_count() or 1) for r in runs), 1),
        "load_generator": {
            "processes": len(runs[0].generator),
            "max_process_cpu_percent_of_one_core": max(gen_cpu, default=0.0),
            "total_cpu_percent_of_one_core": round(max(gen_total, default=0.0), 1),
            "caller_clock_lateness_ms": {"p99": caller_late.percentile(0.99),
                                         "max": round(caller_late.max_ms, 2)},
            "standin_clock_lateness_ms": {"p99": standin_late.percentile(0.99),
                                          "max": round(standin_late.max_ms, 2)},
        },
    }


def _server_env(config: Config, port: int, standin_port: int,
                scratch: Path) -> dict[str, str]:
    """The server's settings; what it writes (records, spool, recordings) goes to `scratch`,
    never into the checkout it runs from."""
    env = {**os.environ,
           "DATABASE_URL": f"sqlite:///{scratch / 'calls.db'}",
           "RECORDS_SPOOL": str(scratch / "records-spool.jsonl"),
           "RECORDINGS_DIR": str(scratch / "recordings"),
           "PYTHONPATH": os.pathsep.join(
               p for p in (str(config.source), os.environ.get("PYTHONPATH")) if p),
           "HOST": "127.0.0.1", "PORT": str(port), "PUBLIC_URL": f"http://127.0.0.1:{port}",
           "OPENAI_API_KEY": "bench-key",
           "OPENAI_REALTIME_URL": f"ws://127.0.0.1:{standin_port}/v1/realtime",
           "OPENAI_LIVE_URL": f"ws://127.0.0.1:{standin_port}/v1/live/sessions",
           "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "LOG_LEVEL": "WARNING", "MAX_CALLS": "0",
           "INSTRUCTIONS": "bench {{call_sid}}"}
    return {**env, **config.env}


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(t - time.monotonic(), 0))


async def measure(config: Config, gen: LoadGenerator, calls: int, seconds: float,
                  warmup: float, round_: int = 1) -> Run:
    """Start the server, place `calls` calls, measure for `seconds` after `warmup`, hang up."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        env = _server_env(config, port, gen.standin_port, Path(scratch))
        async with server_process(env, module=config.module, cwd=config.source) as server:
            pid = server.pid
            rss_idle = tree_kib(pid, "VmRSS")
            await _all(gen.standins, "reset")
            k = len(gen.callers)
            await asyncio.gather(*(
                w.ask("dial", base=server.url, calls=list(range(i, calls, k)),
                      auth_token=AUTH_TOKEN, ramp=RAMP * k,
                      delay=RAMP * i) for i, w in enumerate(gen.callers)))
            now = time.monotonic()
            start, t0 = now + 0.05, now + 0.05 + warmup
            t1 = t0 + seconds
            await _all(gen.standins, "window", t0=t0, t1=t1)
            # the calls' 20 ms clocks, phases spread evenly over the 20 ms
            await asyncio.gather(*(
                w.ask("go", start=start, t0=t0, t1=t1,
                      phases=[n * PERIOD / calls for n in range(i, calls, k)])
                for i, w in enumerate(gen.callers)))
            others = [*(w.pid for w in gen.workers), os.getpid()]  # the generator, then the bench

            def cpu() -> list[float]:  # the server, each generator process, the bench
                return [tree_cpu_seconds(pid), *map(cpu_seconds, others)]

            await _sleep_until(t0)
            cpu0, busy0, wall0 = cpu(), machine_busy_seconds(), time.monotonic()
            await _sleep_until(t1)
            cpu1, busy1, wall1 = cpu(), machine_busy_seconds(), time.monotonic()
            rss_loaded = tree_kib(pid, "VmRSS")
            await _all(gen.standins, "quiet")
            await _all(gen.callers, "quiet")
            await _land(gen)
            rss_peak = tree_kib(pid, "VmHWM")
            caller_reports = await _all(gen.callers, "hangup")
            standin_reports = await _all(gen.standins, "report")
    wall = wall1 - wall0
    used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    callers_sum, standins_sum = _sum(caller_reports, standin_reports)
    errors: dict[str, int] = {}
    for report in [*caller_reports, *standin_reports]:
        for why, n in report["errors"].items():
            errors[why] = errors.get(why, 0) + n
    return Run(
        config=config, round=round_, calls=calls, wall=wall, server_cpu=used[0],
        up={"sent": callers_sum["sent"], "received": standins_sum["received"]},
        down={"sent": standins_sum["sent"], "received": callers_sum["received"]},
        up_latency=Histogram.merged(Histogram.from_json(r["latency"]) for r in standin_reports),
        down_latency=Histogram.merged(
            Histogram.from_json(r["latency"]) for r in caller_reports),
        setup_ms=[ms for r in caller_reports for ms in r["setup_ms"]],
        rss_kib={"idle": rss_idle, "loaded": rss_loaded, "peak": rss_peak},
        generator=[{"role": w.role, "cpu_percent_of_one_core": round(u / wall * 100, 1)}
                   for w, u in zip(gen.workers, used[1:-1], strict=True)],
        others_cpu=max(busy1 - busy0 - sum(used), 0.0),
        machine_cpu=busy1 - busy0,
        caller_lateness=Histogram.merged(
            Histogram.from_json(r["lateness"]) for r in caller_reports),
        standin_lateness=Histogram.merged(
            Histogram.from_json(r["lateness"]) for r in standin_reports),
        marks_echoed=sum(r["marks_echoed"] for r in caller_reports),
        errors=errors,
        server_log=[line.rstrip() for line in server.log.items
                    if " WARNING " in line or " ERROR " in line or "Traceback" in line],
    )


async def _land(gen: LoadGenerator, stalled: float = 2.0, limit: float = 60.0) -> None:
    """Let the frames in flight arrive: until every frame sent has, or nothing has arrived
    for `stalled` seconds (those are lost), or `limit` seconds (a saturated run is slow)."""
    loop = asyncio.get_running_loop()
    deadline = progress_at = loop.time()
    deadline += limit
    arrived = -1
    while loop.time() < deadline:
        twilio, openai = _sum(await _all(gen.callers, "counts"),
                              await _all(gen.standins, "counts"))
        if twilio["received"] >= openai["sent"] and openai["received"] >= twilio["sent"]:
            return
        if twilio["received"] + openai["received"] > arrived:
            arrived, progress_at = twilio["received"] + openai["received"], loop.time()
        elif loop.time() - progress_at > stalled:
            return
        await asyncio.sleep(0.05)


def _sum(callers: list[dict[str, Any]], standins: list[dict[str, Any]],
         ) -> tuple[dict[str, int], dict[str, int]]:
    def total(reports: list[dict[str, Any]]) -> dict[str, int]:
        return {key: sum(r[key] for r in reports) for key in ("sent", "received")}

    return total(callers), total(standins)


# --- the whole bench ---


def compile_sources(source: Path) -> None:
    """Bytecode for a checkout's `server` package, as a normal run leaves it. A/B fairness: a
    checkout without it (a fresh worktree, with PYTHONDONTWRITEBYTECODE set) compiles every
    module at each start, which adds about 1.5 MiB to the idle RSS and so skews RSS per call."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(source / "server")],
                   env=env, check=True)


async def run(calls: int = 100, seconds: float = 20.0, rounds: int = 2, warmup: float = 2.0,
              callers: int = 0, standins: int = 0, bridge_env: dict[str, str] | None = None,
              compare: tuple[str, list[str]] | None = None,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every configuration `rounds` times, alternating; the report (as in out/bench.json).

    `callers` / `standins`: processes on each side of the load generator; 0 means one per
    CALLS_PER_PROCESS calls."""
    callers = callers or -(-calls // CALLS_PER_PROCESS)
    standins = standins or -(-calls // CALLS_PER_PROCESS)
    order = configs(bridge_env, compare)
    sources = {c.source for c in order}
    if len(sources) > 1:  # two checkouts compared: both with bytecode
        for source in sources:
            compile_sources(source)
    runs: dict[str, list[Run]] = {c.label: [] for c in order}
    total = rounds * len(order)
    async with load_generator(callers, standins) as gen:
        for r in range(1, rounds + 1):
            for config in order:
                done = sum(len(v) for v in runs.values()) + 1
                result = await measure(config, gen, calls, seconds, warmup, r)
                runs[config.label].append(result)
                s = result.summary()
                lost = (s["caller_to_model"]["frames_lost"], s["model_to_caller"]["frames_lost"])
                echo(f"  run {done}/{total} {config.label:<{max(len(c.label) for c in order)}}"
                     f"  {s['cpu_us_per_relayed_frame']} us/frame, {s['cpu_percent_of_one_core']}"
                     f" % CPU, p99 {s['caller_to_model']['p99_ms']} / "
                     f"{s['model_to_caller']['p99_ms']} ms, lost {lost[0]} / {lost[1]}, "
                     f"generator max {s['load_generator']['max_process_cpu_percent_of_one_core']}"
                     f" % of a core")
    summaries = {label: _summary(rs) for label, rs in runs.items()}
    bare = next(c for c in order if c.is_bare)
    ratios = {}
    for config in order:
        if config.is_bare:
            continue
        mine, base = summaries[config.label], summaries[bare.label]
        per_round = [
            round(a.server_cpu / a.relayed / (b.server_cpu / b.relayed), 2)
            if a.relayed and b.relayed and b.server_cpu else None
            for a, b in zip(runs[config.label], runs[bare.label], strict=True)]
        ratio = (round(mine["cpu_us_per_relayed_frame"] / base["cpu_us_per_relayed_frame"], 2)
                 if mine["cpu_us_per_relayed_frame"] and base["cpu_us_per_relayed_frame"]
                 else None)
        ratios[config.label] = {"vs": bare.label, "cpu_per_relayed_frame": ratio,
                                "per_round": per_round}
    return {
        "machine": machine(), "calls": calls, "seconds": seconds, "rounds": rounds,
        "warmup": warmup, "order": [c.label for c in order],
        "load_generator": {"caller_processes": callers, "standin_processes": standins},
        "configs": {label: {"env": next(c.env for c in order if c.label == label),
                            "summary": summaries[label],
                            "runs": [_run_json(r) for r in rs]} for label, rs in runs.items()},
        "ratios": ratios,
        "server_log_problems": {label: [line for r in rs for line in r.server_log][:10]
                                for label, rs in runs.items()},
    }


def _run_json(r: Run) -> dict[str, Any]:
    return {"round": r.round, **r.summary(), "generator_processes": r.generator}


# --- printing ---


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    labels = list(report["configs"])
    s = {label: report["configs"][label]["summary"] for label in labels}

    def ms(d: dict[str, Any]) -> str:
        return f"{d['p50_ms']} / {d['p99_ms']} / {d['max_ms']} ms"

    def gen(x: dict[str, Any]) -> str:
        g = x["load_generator"]
        return (f"{g['max_process_cpu_percent_of_one_core']} % "
                f"(all {g['processes']}: {round(g['total_cpu_percent_of_one_core'], 1)} %)")

    def late(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda x: (f"{x['load_generator'][key]['p99']} / "
                          f"{x['load_generator'][key]['max']} ms")

    rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("caller->model latency p50/p99/max", lambda x: ms(x["caller_to_model"])),
        ("model->caller latency p50/p99/max", lambda x: ms(x["model_to_caller"])),
        ("frames sent (caller->model / model->caller)", lambda x: (
            f"{x['caller_to_model']['frames_sent']} / {x['model_to_caller']['frames_sent']}")),
        ("frames lost (caller->model / model->caller)", lambda x: (
            f"{x['caller_to_model']['frames_lost']} / {x['model_to_caller']['frames_lost']}")),
        ("relayed frames per second", lambda x: x["relayed_frames_per_second"]),
        ("CPU per relayed frame", lambda x: (
            f"{x['cpu_us_per_relayed_frame']} us  (runs: "
            + ", ".join(str(v) for v in x["cpu_us_per_relayed_frame_per_run"]) + ")")),
        ("CPU", lambda x: f"{x['cpu_percent_of_one_core']} % of one core"),
        ("RSS idle / loaded / peak", lambda x: (
            f"{x['rss_idle_mib']} / {x['rss_loaded_mib']} / {x['rss_peak_mib']} MiB")),
        ("RSS per call", lambda x: f"{x['rss_per_call_kib']} KiB"),
        ("call set-up p50 / max", lambda x: (
            f"{x['setup_ms']['p50']} / {x['setup_ms']['max']} ms")),
        ("marks echoed per second", lambda x: x["marks_echoed_per_second"]),
        ("load generator CPU, busiest process", gen),
        ("caller clock lateness p99 / max", late("caller_clock_lateness_ms")),
        ("stand-in clock lateness p99 / max", late("standin_clock_lateness_ms")),
        ("other processes on the machine (max)", lambda x: (
            f"{x['other_processes_cpu_percent_of_one_core']} % of one core")),
        ("whole machine busy (max)", lambda x: f"{x['machine_busy_percent']} % of all cores"),
        ("errors / server log warnings", lambda x: (
            f"{sum(x['errors'].values())} / {x['server_log_problems']}")),
    ]
    cells = [[str(fn(s[label])) for label in labels] for _, fn in rows]
    first = max(len(name) for name, _ in rows)
    widths = [max(len(label), *(len(row[i]) for row in cells)) for i, label in enumerate(labels)]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"load generator on {m['load_generator_loop']}",
        f"{report['calls']} calls x {report['seconds']:g} s measured per run, "
        f"{report['rounds']} round(s): " + ", ".join(report["order"]),
        f"load generator: {report['load_generator']['caller_processes']} caller + "
        f"{report['load_generator']['standin_processes']} stand-in process(es)",
        "",
        (" " * first + "  " + "  ".join(
            f"{lab:<{w}}" for lab, w in zip(labels, widths, strict=True))).rstrip(),
    ]
    for (name, _), row in zip(rows, cells, strict=True):
        lines.append((f"{name:<{first}}  " + "  ".join(
            f"{c:<{w}}" for c, w in zip(row, widths, strict=True))).rstrip())
    lines.append("")
    for label, r in report["ratios"].items():
        rounds = ", ".join(str(v) for v in r["per_round"])
        lines.append(f"{label} CPU per relayed frame: {r['cpu_per_relayed_frame']} x the "
                     f"{r['vs']}'s (per round: {rounds})")
    for label in labels:
        lines += [f"warning, {label}: {w}" for w in warnings(s[label])]
    for label, problems in report["server_log_problems"].items():
        for line in problems[:3]:
            lines.append(f"{label} logged: {line[:160]}")
    for label in labels:
        for why, n in s[label]["errors"].items():
            lines.append(f"{label}: {n} x {why}")
    return "\n".join(lines)


def warnings(summary: dict[str, Any]) -> list[str]:
    """What makes a configuration's numbers the machine's or the generator's, not its own."""
    found = []
    g = summary["load_generator"]
    late = max(g["caller_clock_lateness_ms"]["p99"] or 0,
               g["standin_clock_lateness_ms"]["p99"] or 0)
    if late > FRAME_LATE_MS:
        found.append(f"the load generator ran {late} ms behind its 20 ms clock (p99): latencies "
                     "include its delay")
    if g["max_process_cpu_percent_of_one_core"] > 70:
        found.append(f"a load generator process used {g['max_process_cpu_percent_of_one_core']}"
                     " % of a core: add processes (--callers / --standins)")
    if summary["machine_busy_percent"] > 90:
        found.append(f"the machine was {summary['machine_busy_percent']} % busy: the server and "
                     "the load generator competed for CPU")
    if summary["other_processes_cpu_percent_of_one_core"] > 10:
        found.append(f"other processes used {summary['other_processes_cpu_percent_of_one_core']}"
                     " % of a core meanwhile")
    return found


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def _comparison(text: str) -> tuple[str, list[str]]:
    name, values = _assignment(text)
    pair = values.split(",")
    if len(pair) != 2:
        raise argparse.ArgumentTypeError(f"expected NAME=A,B (two values), not {text!r}")
    return name, pair


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--callers", type=int, default=0,
                        help=f"caller processes (default: one per {CALLS_PER_PROCESS} calls)")
    parser.add_argument("--standins", type=int, default=0,
                        help=f"stand-in processes (default: one per {CALLS_PER_PROCESS} calls)")
    parser.add_argument("--bridge-env", type=_assignment, action="append", default=[],
                        metavar="NAME=VALUE", help="set for every bridge run (repeatable)")
    parser.add_argument("--compare", type=_comparison, default=None, metavar="NAME=A,B",
                        help="run the bridge with NAME=A and with NAME=B")
    parser.add_argument("--json", type=Path, default=Path("out/bench.json"))
    args = parser.parse_args(argv)
    print(f"bench: {args.calls} simultaneous calls, full duplex, {args.seconds:g} s measured "
          f"per run, {args.rounds} round(s)")
    report = asyncio.run(run(args.calls, args.seconds, args.rounds, args.warmup, args.callers,
                             args.standins, dict(args.bridge_env), args.compare))
    print()
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
