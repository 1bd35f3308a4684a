"""Run the tokenforget CLI with scoring and training slowed down, so a test can kill -9 it mid-stage.

Usage: python slow_cli.py SECONDS_PER_CALL tokenforget-args...
"""

import sys
import time

import tokenforget.stages.score as score
import tokenforget.training.trainer as train

delay = float(sys.argv[1])
_score = score.score_tokens


def slow_score(*args, **kwargs):
    time.sleep(delay)
    return _score(*args, **kwargs)


score.score_tokens = slow_score
_step = train.ForgettingTrainer.training_step


def slow_step(self, *args, **kwargs):
    time.sleep(delay)
    return _step(self, *args, **kwargs)


train.ForgettingTrainer.training_step = slow_step

from tokenforget.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
