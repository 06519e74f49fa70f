"""Soak test: N clients hammer a loopback server for T minutes; prints requests, errors, latency and server memory.

The server is started here (``python -m medprivacy.cli serve`` with the shipped models, or ``--models-dir``), in
its own process, exactly as an operator starts it; ``--url`` with ``--server-pid`` soaks a server already running.
Each client is a thread with its own connection that loops, until the time is up, over a mix of real requests:
a Mixup batch of mixed-looking patches (``/v1/mixup/segment``), a MedLocker classification of a few images,
a lesion map, and a short watermark search (``/v1/watermark/optimize``), all with random content.

Printed (and written to --out as JSON): requests, errors (any exception or non-200 answer) by kind, latency
p50/p95 overall and per kind, and the server's resident memory (VmRSS, sampled every 5 s) at the start of the
load, after one minute, at mid-time and at the end, with the growth after the first minute (the first minute is
warm-up: weights paged in, first-touch allocations). Each of these is given twice: the single sample at that
moment, and the median of the samples of the minute around it (the last minute for "end"), since a sample taken
while several large requests are in flight reads up to ~180 MiB above the level the server returns to. Growth
is judged on the medians; the maximum is printed too. Figures, not pass/fail. Bounded: it stops at T minutes.

    python bench/soak.py --clients 8 --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("mixup", "classify", "lesions", "optimize")


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def start_server(models_dir: Path, log_path: Path, extra: list[str]):
    """A local server for the soak (``medprivacy.server.local``), answering /v1/health, or SystemExit with its log."""
    from medprivacy.errors import MedPrivacyError
    from medprivacy.server.local import launch_local_server

    env = {k: v for k, v in os.environ.items() if k != "MEDPRIVACY_TOKEN"}
    server = launch_local_server(
        ["--models-dir", str(models_dir), "--log-level", "warning", *extra], log_path, env=env, cwd=ROOT
    )
    try:
        return server.wait_ready(180)
    except MedPrivacyError as exc:
        raise SystemExit(f"{exc}:\n{log_path.read_text(errors='replace')}") from None


class Client(threading.Thread):
    def __init__(self, index: int, url: str, deadline: float, info: dict, kinds: tuple[str, ...], results: list):
        super().__init__(name=f"client-{index}", daemon=True)
        self.index, self.url, self.deadline, self.info, self.kinds, self.results = (
            index,
            url,
            deadline,
            info,
            kinds,
            results,
        )

    def run(self) -> None:
        from medprivacy.transport.watermark_client import WatermarkClient
        from medprivacy.watermark import blending

        rng = np.random.default_rng(1000 + self.index)
        client = WatermarkClient(self.url, retries=0, read_timeout=600)
        patch = self.info["models"].get("mixup-seg", {}).get("patch_size")
        logo = blending.default_logo(64)
        turn = self.index  # clients start at different kinds, so the mix is even from the first second
        while time.monotonic() < self.deadline:
            kind = self.kinds[turn % len(self.kinds)]
            turn += 1
            started = time.monotonic()
            error = None
            try:
                if kind == "mixup":
                    client.segment(rng.random((16, 1, *patch), dtype=np.float32))
                elif kind == "classify":
                    client.classify(rng.random((4, 3, 160, 160), dtype=np.float32))
                elif kind == "lesions":
                    client.lesions(rng.random((3, 200, 180), dtype=np.float32))
                else:
                    pixels = rng.integers(0, 256, (128, 144, 3), dtype=np.uint8)
                    client.optimize(
                        pixels,
                        logo,
                        mode="wap",
                        lesions="none",
                        population=8,
                        generations=1,
                        local_iterations=1,
                        seed=int(rng.integers(0, 2**31)),
                    )
            except Exception as exc:  # every failure is a figure of the soak, not a reason to stop it
                error = f"{type(exc).__name__}: {str(exc)[:200]}"
            self.results.append((kind, time.monotonic() - started, error, time.monotonic()))


def percentile(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "Resources" / "Models")
    parser.add_argument("--url", default=None, help="soak a running server instead of starting one")
    parser.add_argument(
        "--server-pid", type=int, default=None, help="its process id, to read its memory (same machine)"
    )
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"request kinds to mix (default {','.join(KINDS)})")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra option for the started server (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        parser.error(f"--kinds takes some of {', '.join(KINDS)}")

    from medprivacy.transport.watermark_client import WatermarkClient

    scratch = tempfile.TemporaryDirectory(prefix="medprivacy-soak-")
    server = None
    if args.url is None:
        server = start_server(args.models_dir, Path(scratch.name) / "server.log", args.server_arg)
        url, pid = server.url, server.process.pid
    else:
        url, pid = args.url, args.server_pid
    try:
        info = WatermarkClient(url, retries=0).info()
        if "mixup-seg" not in info["models"]:
            kinds = tuple(k for k in kinds if k != "mixup")
        duration = args.minutes * 60.0
        results: list = []
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        deadline = started + duration
        clients = [Client(i, url, deadline, info, kinds, results) for i in range(args.clients)]
        for client in clients:
            client.start()
        print(
            f"soak: {args.clients} clients x {args.minutes:g} min on {url} ({', '.join(kinds)}); server pid {pid}",
            flush=True,
        )
        next_sample = started
        while time.monotonic() < deadline:
            now = time.monotonic()
            if pid is not None and now >= next_sample:
                value = rss_mib(pid)
                if value is not None:
                    samples.append((now - started, value))
                next_sample += args.sample_every
                if len(samples) % 12 == 1:
                    done = len(results)
                    print(
                        f"  {now - started:6.0f} s: {done} requests, {sum(1 for r in results if r[2])} errors, "
                        f"server RSS {value:.0f} MiB",
                        flush=True,
                    )
            time.sleep(0.2)
        for client in clients:
            client.join(timeout=660)  # a request in flight at the deadline finishes (read timeout 600 s)
        if pid is not None and rss_mib(pid) is not None:
            samples.append((time.monotonic() - started, rss_mib(pid)))
    finally:
        if server is not None:
            server.stop()
        log_text = server.log() if server is not None else ""
        scratch.cleanup()

    def rss_at(seconds: float) -> float | None:
        before = [value for at, value in samples if at <= seconds]
        return before[-1] if before else (samples[0][1] if samples else None)

    latencies = [r[1] for r in results]
    errors = Counter(r[2].split(":")[0] for r in results if r[2])
    per_kind = defaultdict(list)
    for kind, seconds, error, _ in results:
        if not error:
            per_kind[kind].append(seconds)

    def level(low: float, high: float) -> float | None:
        window = [value for at, value in samples if low <= at <= high]
        return float(np.median(window)) if window else None

    end_at = samples[-1][0] if samples else duration
    rss = {
        "start": samples[0][1] if samples else None,
        "1min": rss_at(60.0),
        "mid": rss_at(duration / 2),
        "end": samples[-1][1] if samples else None,
        "max": max((v for _, v in samples), default=None),
    }
    median = {
        "1min": level(30.0, 90.0),
        "mid": level(duration / 2 - 30.0, duration / 2 + 30.0),
        "end": level(end_at - 60.0, end_at),
    }
    growth = (median["end"] - median["1min"]) / median["1min"] if median["end"] and median["1min"] else None
    growth_samples = (rss["end"] - rss["1min"]) / rss["1min"] if rss["end"] and rss["1min"] else None
    report = {
        "clients": args.clients,
        "minutes": args.minutes,
        "kinds": list(kinds),
        "requests": len(results),
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
        "error_examples": sorted({r[2] for r in results if r[2]})[:5],
        "latency_s": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            **{
                kind: {"requests": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)}
                for kind, v in per_kind.items()
            },
        },
        "server_rss_mib": rss,
        "server_rss_mib_minute_median": median,
        "rss_growth_after_first_minute": growth,
        "rss_growth_after_first_minute_single_samples": growth_samples,
        "rss_samples": [[round(at, 1), round(value, 1)] for at, value in samples],
        "server_log_errors": [line for line in log_text.splitlines() if "ERROR" in line or "Traceback" in line][:10],
        "allocator": os.environ.get("MALLOC_ARENA_MAX", "server default (see medprivacy/server/hardening.py)"),
    }
    print(f"requests {report['requests']}, errors {report['errors']} {dict(errors) if errors else ''}")
    print(
        f"latency p50 {report['latency_s']['p50']:.2f} s, p95 {report['latency_s']['p95']:.2f} s"
        if latencies
        else "latency: no requests"
    )
    for kind in kinds:
        if kind in report["latency_s"]:
            entry = report["latency_s"][kind]
            print(f"  {kind}: {entry['requests']} ok, p50 {entry['p50']:.2f} s, p95 {entry['p95']:.2f} s")
    if samples and growth is not None:
        print(
            f"server RSS MiB, samples: start {rss['start']:.0f}, 1 min {rss['1min']:.0f}, mid {rss['mid']:.0f}, "
            f"end {rss['end']:.0f}, "
            f"max {rss['max']:.0f} (growth after minute 1: {100 * growth_samples:+.1f} %)"
        )
        print(
            f"server RSS MiB, minute medians: 1 min {median['1min']:.0f}, mid {median['mid']:.0f}, "
            f"end {median['end']:.0f}; "
            f"growth after the first minute {100 * growth:+.1f} %"
        )
    if report["server_log_errors"]:
        print("server log errors:\n  " + "\n  ".join(report["server_log_errors"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
