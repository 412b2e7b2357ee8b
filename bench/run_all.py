"""Run every benchmark in bench/ one after another: ``python bench/run_all.py [--quick]``.

Each benchmark times histolight against a baseline measured in the same run and prints the ratio.
"""

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    extra = sys.argv[1:]
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n===== {script.name} {' '.join(extra)} =====", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(script), *extra])
        print(f"===== {script.name}: exit {rc} in {time.time() - t0:.0f} s =====", flush=True)
        if rc:
            failed.append(script.name)
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
