"""Start-up time of `alignkit --help` against a peer CLI (TRL's `trl --help` when installed).

Each command runs as a fresh process `--repeats` times; the script prints the median wall time of each,
the ratio, and which heavy modules `alignkit --help` imported (none of torch, transformers, pydantic is
the goal: the command list is built without importing any config class).

    python bench/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time


def timed(cmd, repeats):
    """(median wall seconds, median CPU seconds of the child): CPU time is steadier on a busy machine."""
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def heavy_imports() -> list:
    code = ("import sys; from alignkit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY:' + ','.join(m for m in ('torch', 'transformers', 'pydantic', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("HEAVY:"))
    return [m for m in line[len("HEAVY:"):].split(",") if m]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    rows = [("python -c pass (interpreter floor)", timed([sys.executable, "-c", "pass"], args.repeats)),
            ("alignkit --help", timed([sys.executable, "-m", "alignkit", "--help"], args.repeats)),
            ("alignkit sft --help", timed([sys.executable, "-m", "alignkit", "sft", "--help"], args.repeats))]
    trl = shutil.which("trl")
    if trl:
        rows.append(("trl --help", timed([trl, "--help"], args.repeats)))
    width = max(len(r[0]) for r in rows)
    print(f"{'command':<{width}}  {'wall':>8}  {'cpu':>8}")
    for name, (wall, cpu) in rows:
        print(f"{name:<{width}}  {wall * 1000:6.0f} ms  {cpu * 1000:6.0f} ms")
    if trl:
        print(f"trl / alignkit (--help wall): {rows[3][1][0] / rows[1][1][0]:.2f}x")
    print("heavy modules imported by `alignkit --help`:", ", ".join(heavy_imports()) or "none")


if __name__ == "__main__":
    main()
