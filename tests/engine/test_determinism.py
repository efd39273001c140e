"""Runs that repeat: the switches that make a run's arithmetic the same every time."""

from __future__ import annotations

import os
import subprocess
import sys

from sdofm.config import load_config
from sdofm.engine import loop_config

JOB = {"epochs": 1, "schedule_steps": 0, "lr": 1e-3}


def test_train_deterministic_turns_on_deterministic_kernels_in_the_worker_process():
    assert loop_config(load_config(None, ["train.deterministic=true"]), **JOB).deterministic
    assert not loop_config(load_config(), **JOB).deterministic
    assert loop_config(load_config(), **JOB).ordered  # the plan's data order, by default
    # In a fresh process: the switches are process-wide.
    code = (
        "import os, torch\n"
        "from sdofm.engine.loop import deterministic_kernels\n"
        "assert not torch.are_deterministic_algorithms_enabled()\n"
        "deterministic_kernels()\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark\n"
        "assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32\n"
        "assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
