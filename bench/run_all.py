"""Run the benchmark suite: every ``bench/bench_*.py`` in turn, with the same flags.

    python bench/run_all.py --quick                    # what `make bench` runs (a few minutes on 2 cores)
    python bench/run_all.py                            # full runs
    python bench/run_all.py --only extract segment -- --reps 3    # some benchmarks; flags after -- go to each

Each benchmark times histolight against a baseline measured in the same run and prints the ratio (extraction cases
A-D and the per-slide overhead, tiled segmentation inference, stain normalizers, the tile loader, feature extraction,
TFRecord CRCs). The GPU suite is separate: ``bash bench/gpu_suite.sh``. Exit status 1 when any benchmark failed.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the quick version of every benchmark")
    ap.add_argument("--only", nargs="+", help="benchmark names (bench_<name>.py), default: all")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="flags after -- go to every benchmark")
    a = ap.parse_args(argv)
    extra = [*(["--quick"] if a.quick else []), *[x for x in a.extra if x != "--"]]
    scripts = sorted(HERE.glob("bench_*.py"))
    if a.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in a.only]
    rows = []
    for script in scripts:
        print(f"\n===== {script.name} {' '.join(extra)} (load average {os.getloadavg()[0]:.1f}) =====", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(script), *extra])
        rows.append((script.name, rc, time.time() - t0))
        print(f"===== {script.name}: exit {rc} in {rows[-1][2]:.0f} s =====", flush=True)
    print(
        "\n" + "\n".join(f"  {name:24s} {'ok' if rc == 0 else f'FAILED (exit {rc})':18s} {sec:6.0f} s" for name, rc, sec in rows)
    )
    print(f"  total {sum(r[2] for r in rows):.0f} s; load average now {os.getloadavg()[0]:.1f}")
    return 1 if any(rc for _, rc, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
