"""Run bnfold from a checkout without installing it: ``python cli.py fold model.onnx -o out.onnx``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bnfold.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
