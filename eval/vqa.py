"""VQA evaluation from a checkout: `python eval/vqa.py --data FILE [--image-root DIR] [--adapter FILE] ...` (also
`python -m eval.vqa`), the same command as `mmadapter eval vqa`. The code lives in `mmadapter.evaluation`
(vqa: the runner, vqa_data: inputs, vqa_metrics: metrics, vqa_report: tables) and `mmadapter.commands.eval_vqa`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmadapter.commands.eval_vqa import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
