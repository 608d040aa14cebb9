"""Long runs: memory and log growth of ``dlearner train`` as a user runs it, over N minutes.

Run from the project root: ``python benchmarks/long_run.py [--minutes 30] [--algo PPO APPO] [--interval 15]``

For each algorithm it starts ``dlearner train --algo ALGO --env CartPole-v1 --num-learners 2
--num-env-runners 1 --checkpoint DIR`` (an embedded Dask cluster, the dashboard and the metrics
file as by default) in a process group of its own, samples the resident memory (RSS, psutil) of the
driver and of every worker process every ``--interval`` seconds, and after ``--minutes`` stops it
with SIGINT as a terminal's Ctrl-C would. It prints, per process, the RSS at the end of warm-up and
at the end and the slope after warm-up (least squares over the samples after ``--warmup-minutes``),
the growth of the metrics file per hour and per day, and iterations per second. Goal (issue 22):
every slope <= 0.5 MiB/min and the run folder growing <= 100 MB a day at the default settings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import psutil

MIB = 2**20


def slope_mib_per_min(samples: List[Tuple[float, int]], after_s: float) -> float:
    """Least-squares slope of RSS against time over the samples taken after ``after_s`` seconds."""
    points = [(t, rss) for t, rss in samples if t >= after_s]
    if len(points) < 3:
        return float("nan")
    t, rss = np.array(points, dtype=float).T
    return float(np.polyfit(t / 60.0, rss / MIB, 1)[0])


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(algo: str, minutes: float, interval: float, warmup_minutes: float, extra: List[str]) -> Dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix=f"long_run_{algo}_"))
    command = [
        sys.executable, "-m", "dlearner.cli", "train", "--algo", algo, "--env", "CartPole-v1",
        "--num-learners", "2", "--num-env-runners", "1", "--checkpoint", str(folder / "run"),
        "--stop-timesteps", str(10**12), "-q", *extra,
    ]  # fmt: skip
    log = open(folder / "stderr.log", "w")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    driver = psutil.Process(proc.pid)
    samples: Dict[str, List[Tuple[float, int]]] = {}
    names: Dict[int, str] = {proc.pid: "driver (+ embedded scheduler)"}
    start = time.monotonic()
    try:
        while time.monotonic() - start < minutes * 60 and proc.poll() is None:
            now = time.monotonic() - start
            for p in [driver, *driver.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    cmdline = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                if p.pid not in names:
                    if "resource_tracker" in cmdline or "semaphore_tracker" in cmdline:
                        continue
                    names[p.pid] = f"worker process {len(names)} (pid {p.pid})"
                samples.setdefault(names[p.pid], []).append((now, rss))
            time.sleep(interval)
        elapsed = time.monotonic() - start
        metrics = folder / "run" / "metrics.jsonl"
        metrics_bytes = metrics.stat().st_size if metrics.exists() else 0
        iterations = sum(1 for _ in metrics.open()) if metrics.exists() else 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the run finishes its iteration and saves
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    exit_code = proc.returncode
    run_bytes = folder_bytes(folder / "run")
    stderr_tail = (folder / "stderr.log").read_text()[-2000:]
    shutil.rmtree(folder, ignore_errors=True)
    warmup_s = warmup_minutes * 60
    processes = {
        name: {
            "rss_after_warmup_mib": next((rss for t, rss in points if t >= warmup_s), points[-1][1]) / MIB,
            "rss_end_mib": points[-1][1] / MIB,
            "slope_mib_per_min": slope_mib_per_min(points, warmup_s),
        }
        for name, points in samples.items()
        if len(points) > 1
    }
    return {
        "algo": algo,
        "minutes": elapsed / 60,
        "exit_code": exit_code,
        "iterations": iterations,
        "iterations_per_s": iterations / elapsed,
        "metrics_mb_per_day": metrics_bytes / 1e6 * 86400 / elapsed,
        "metrics_bytes_per_line": metrics_bytes / max(iterations, 1),
        "run_folder_mb": run_bytes / 1e6,
        "processes": processes,
        "stderr_tail": stderr_tail,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--algo", nargs="+", default=["PPO", "APPO"])
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between RSS samples")
    parser.add_argument("--warmup-minutes", type=float, default=None, help="default: a fifth of the run, at least 1")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `dlearner train` flags")
    args = parser.parse_args()
    warmup = args.warmup_minutes if args.warmup_minutes is not None else max(1.0, args.minutes / 5)
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    for algo in args.algo:
        out = run_one(algo, args.minutes, args.interval, warmup, args.extra)
        print(f"\n## {algo}: {out['minutes']:.1f} min, exit code {out['exit_code']}, warm-up {warmup:.1f} min\n")
        print("| process | RSS after warm-up (MiB) | RSS at end (MiB) | slope after warm-up (MiB/min) |")
        print("|---|---|---|---|")
        for name, p in out["processes"].items():
            print(f"| {name} | {p['rss_after_warmup_mib']:.0f} | {p['rss_end_mib']:.0f} | {p['slope_mib_per_min']:+.3f} |")
        print(
            f"\niterations: {out['iterations']} ({out['iterations_per_s']:.3f}/s); metrics.jsonl "
            f"{out['metrics_bytes_per_line']:.0f} B/line, {out['metrics_mb_per_day'] / 24:.2f} MB/hour, "
            f"{out['metrics_mb_per_day']:.1f} MB/day; run folder at the end {out['run_folder_mb']:.1f} MB",
            flush=True,
        )
        if out["exit_code"] not in (0, 130):
            print(f"stderr (tail):\n{out['stderr_tail']}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
