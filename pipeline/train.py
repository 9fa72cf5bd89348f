"""DVC stage `train` (see dvc.yaml for its inputs and outputs)."""

import sys

from digits.cli import run_command

sys.exit(run_command("train"))
