"""The one entrypoint: ``python run.py task=<name> [experiment=<name>] [key=value ...]``.

The same as the ``histolight`` command (:mod:`histolight.cli`). See README.md and ``conf/`` for every option;
``python run.py --help`` lists config groups.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("HISTOLIGHT_ROOT", str(ROOT))
if (ROOT / "src").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # works from a checkout even before `pip install -e .`

try:
    import hydra  # noqa: F401
except ModuleNotFoundError as e:  # a Python without the project's packages (the venv not activated)
    venv = ROOT / ".venv" / "bin"
    how = (
        f"use the project's environment: {venv / 'histolight'} ... (or {venv / 'python'} run.py ..., "
        "or `source .venv/bin/activate` first)"
        if (venv / "python").exists()
        else "install the project first: `make install` (or `pip install -e .`)"
    )
    sys.exit(f"run.py: {e.name!r} is not installed for {sys.executable}; {how}")

from histolight.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
