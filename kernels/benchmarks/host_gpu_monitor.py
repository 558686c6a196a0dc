"""Background monitor for benchmark runs on a lent machine: the GPU's SM clock, power and load
(``nvidia-smi``, every 0.5 s) and the host's speed (a fixed pure-Python workload, timed every
0.25 s), both with unix timestamps, so slow stretches of a host-bound eager decode run can be
told apart: a slow host shows as a slower probe, an idle-clocked GPU as a low SM clock.

    python3 kernels/benchmarks/host_gpu_monitor.py --out $OUT/monitor & MON=$!
    ... benchmark ...
    kill $MON        # files: gpu.csv (t, sm_mhz, mem_mhz, power_w, util_pct), host.csv (t, probe_ms)

bench.json rows carry ``repeat_started_at`` (unix time of each repeat) to line them up.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu"


def probe_ms(n: int = 20_000) -> float:
    """Milliseconds of a fixed pure-Python loop (~1 ms on a fast core): the host's speed right now."""
    t0 = time.perf_counter()
    acc = 0
    for i in range(n):
        acc += i * i
    return (time.perf_counter() - t0) * 1e3


def host_loop(path: Path, stop: threading.Event, period: float = 0.25) -> None:
    with path.open("w") as f:
        f.write("t,probe_ms\n")
        while not stop.is_set():
            t = time.time()
            f.write(f"{t:.3f},{probe_ms():.4f}\n")
            f.flush()
            stop.wait(period)


_CHILDREN: list[subprocess.Popen] = []


def gpu_loop(path: Path, stop: threading.Event) -> None:
    cmd = ["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", "-lms", "500"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        return
    _CHILDREN.append(proc)
    with path.open("w") as f:
        f.write("t,sm_mhz,mem_mhz,power_w,util_pct\n")
        for line in proc.stdout:
            if stop.is_set():
                break
            parts = [p.strip() for p in line.split(",")]
            try:  # "2026/12/01 08:37:41.123" -> unix time (the machine's local time zone)
                t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            except ValueError:
                continue
            f.write(",".join([f"{t:.3f}", *parts[1:]]) + "\n")
            f.flush()
    proc.terminate()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu.csv and host.csv")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = [threading.Thread(target=host_loop, args=(out / "host.csv", stop), daemon=True),
               threading.Thread(target=gpu_loop, args=(out / "gpu.csv", stop), daemon=True)]
    for t in threads:
        t.start()
    while not stop.is_set():
        stop.wait(0.5)
    for proc in _CHILDREN:
        proc.terminate()
    sys.exit(0)


if __name__ == "__main__":
    main()
