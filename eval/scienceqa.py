"""ScienceQA evaluation from a checkout: `python eval/scienceqa.py --data DIR [--adapter FILE] ...` (also
`python -m eval.scienceqa`), the same command as `mmadapter eval scienceqa`. The code lives in
`mmadapter.evaluation` (runner, metrics, answer parsing, result files) and `mmadapter.commands.eval`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmadapter.commands.eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
