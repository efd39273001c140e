"""One training engine for every objective: the Ray Train loop, its checkpoint format, the
lr schedule, and the driver's ``TorchTrainer`` set-up.

Pretraining and finetuning each bring an :class:`Objective` (model, loss, evaluation); the
loop, checkpoints, resume and rank-0 tracking are the same for all of them.
"""

from sdofm.engine.checkpoint import TrainState, load_checkpoint, save_checkpoint
from sdofm.engine.loop import LoopConfig, loop_config
from sdofm.engine.objective import EvalContext, Evaluation, Objective, Phase, Schedule, StepInfo
from sdofm.engine.trainer import FitResult, RunFailedError, fit, storage_path

__all__ = [
    "EvalContext",
    "Evaluation",
    "FitResult",
    "RunFailedError",
    "LoopConfig",
    "Objective",
    "Phase",
    "Schedule",
    "StepInfo",
    "TrainState",
    "fit",
    "load_checkpoint",
    "loop_config",
    "save_checkpoint",
    "storage_path",
]
