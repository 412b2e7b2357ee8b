"""The one entrypoint: ``python run.py task=<name> [experiment=<name>] [key=value ...]``.

See README.md and ``conf/`` for every option; ``python run.py --help`` lists config groups.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("HISTOLIGHT_ROOT", str(ROOT))
if (ROOT / "src").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # works from a checkout even before `pip install -e .`

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from histolight.tasks import execute

    return execute(cfg)


if __name__ == "__main__":
    main()
