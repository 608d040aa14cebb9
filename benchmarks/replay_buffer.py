"""Replay buffer memory and speed on 1,000,000 Pendulum-v1 transitions, uniform and prioritized.

Run: python benchmarks/replay_buffer.py [--rows 1000000] [--repeats 2000]

Columns as the SAC learner's batches: obs and new_obs float32 (3,), actions float32 (1,), rewards
float32, terminateds and truncateds bool, n_step uint8. Goals (issue 18): the buffer takes <= 1.2x
the bytes of the raw columns (``nbytes``, and what tracemalloc saw numpy allocate), and sampling a
256-row batch (``sample_indices`` + ``gather``) takes well under a millisecond.

The reference is plain numpy on the raw arrays in the same process: slice writes into preallocated
arrays for adding, ``rng.integers`` + fancy indexing for sampling, and one fancy-indexed write of the
new priorities (no tree) for updating them; "ratio" is the buffer's time over the reference's.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tracemalloc

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import median_time, print_table  # noqa: E402

from dlearner.replay import PrioritizedReplayBuffer, ReplayBuffer  # noqa: E402

FRAGMENT_ROWS = 1000
FILL_REPEATS = 3
BATCH_ROWS = 256


def pendulum_columns(rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.normal(size=(rows, 3)).astype(np.float32),
        "actions": rng.uniform(-2, 2, size=(rows, 1)).astype(np.float32),
        "rewards": rng.uniform(-16, 0, size=rows).astype(np.float32),
        "new_obs": rng.normal(size=(rows, 3)).astype(np.float32),
        "terminateds": np.zeros(rows, bool),
        "truncateds": rng.random(rows) < 0.005,
        "n_step": np.ones(rows, np.uint8),
    }


def fill(buffer: ReplayBuffer, columns: dict) -> ReplayBuffer:
    rows = len(columns["obs"])
    for start in range(0, rows, FRAGMENT_ROWS):
        buffer.add({name: column[start : start + FRAGMENT_ROWS] for name, column in columns.items()})
    return buffer


def reference_fill(arrays: dict, columns: dict) -> None:
    rows = len(columns["obs"])
    for start in range(0, rows, FRAGMENT_ROWS):
        for name, column in columns.items():
            arrays[name][start : start + FRAGMENT_ROWS] = column[start : start + FRAGMENT_ROWS]


def traced_bytes(make) -> int:
    """Bytes allocated (and still held) while ``make()`` ran: numpy reports its arrays to tracemalloc."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    made = make()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del made
    return held


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    columns = pendulum_columns(args.rows)
    raw_bytes = sum(column.nbytes for column in columns.values())
    reference = Reference(columns, args.repeats)
    memory_rows = [("raw columns", f"{raw_bytes:,}", "", "1.000", "")]
    time_rows = [
        ("numpy reference", f"add {args.rows:,} rows", us(reference.fill_s), "1.00", ""),
        ("numpy reference", f"sample {BATCH_ROWS} rows", us(reference.sample_s), "1.00", ""),
        ("numpy reference", f"set {BATCH_ROWS} priorities", us(reference.update_s), "1.00", ""),
    ]
    for make in (lambda: ReplayBuffer(args.rows, seed=0), lambda: PrioritizedReplayBuffer(args.rows, seed=0)):
        measure(make, columns, raw_bytes, reference, args.repeats, memory_rows, time_rows)
    print_table(
        f"Memory of {args.rows:,} Pendulum-v1 transitions",
        memory_rows,
        header=("buffer", "nbytes", "tracemalloc", "ratio", "goal"),
    )
    print_table(
        f"Speed (medians over {args.repeats} repeats, adds over {FILL_REPEATS})",
        time_rows,
        header=("run", "what", "median", "ratio", "goal"),
    )


class Reference:
    """Plain numpy on the raw arrays: the times the buffer's are compared with."""

    def __init__(self, columns: dict, repeats: int) -> None:
        arrays = {name: np.empty_like(column) for name, column in columns.items()}
        self.fill_s = median_time(lambda: reference_fill(arrays, columns), repeats=FILL_REPEATS, warmup=1)
        rng = np.random.default_rng(0)
        self.sample_s = median_time(lambda: reference_sample(columns, rng), repeats=repeats)
        indices, td_errors = update_arguments(len(columns["obs"]))
        priorities = np.ones(len(columns["obs"]), np.float32)
        self.update_s = median_time(lambda: priorities.__setitem__(indices, (np.abs(td_errors) + 1e-6) ** 0.6), repeats=repeats)


def measure(make, columns: dict, raw_bytes: int, reference: Reference, repeats: int, memory_rows: list, time_rows: list) -> None:
    """Append one buffer type's memory and time rows."""
    rows = len(columns["obs"])
    buffer = fill(make(), columns)
    kind = buffer.buffer_type
    held = traced_bytes(lambda: fill(make(), columns))
    memory_rows.append((kind, f"{buffer.nbytes:,}", f"{held:,}", f"{buffer.nbytes / raw_bytes:.3f}", "<= 1.2"))
    fill_s = median_time(lambda: fill(make(), columns), repeats=FILL_REPEATS, warmup=1)
    time_rows.append((kind, f"add {rows:,} rows", us(fill_s), f"{fill_s / reference.fill_s:.2f}", ""))
    if kind == "prioritized":  # varied priorities, as after training
        buffer.update_priorities(np.arange(rows), np.random.default_rng(1).exponential(size=rows))
    sample_s = median_time(lambda: buffer.gather(buffer.sample_indices(BATCH_ROWS)[0]), repeats=repeats)
    time_rows.append((kind, f"sample {BATCH_ROWS} rows", us(sample_s), f"{sample_s / reference.sample_s:.2f}", "< 1 ms"))
    if kind == "prioritized":
        indices, td_errors = update_arguments(rows)
        update_s = median_time(lambda: buffer.update_priorities(indices, td_errors), repeats=repeats)
        time_rows.append((kind, f"update_priorities {BATCH_ROWS}", us(update_s), f"{update_s / reference.update_s:.2f}", ""))


def update_arguments(rows: int) -> tuple:
    return np.random.default_rng(2).integers(0, rows, BATCH_ROWS), np.random.default_rng(3).normal(size=BATCH_ROWS)


def reference_sample(columns: dict, rng: np.random.Generator) -> dict:
    indices = rng.integers(0, len(columns["obs"]), BATCH_ROWS)
    return {name: column[indices] for name, column in columns.items()}


if __name__ == "__main__":
    main()
