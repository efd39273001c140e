"""MLflow: where runs go, one run life cycle on the driver, rank-0 logging, the offline
record and its sync, figures, models.

Logging never stops training. When the tracking server cannot be reached (at the start
or later) a warning is printed once and metrics, params and figures are kept in the
run's tracking folder instead (``metrics.jsonl``, ``tags.json``, ``figures/``), which
``sdofm mlflow sync`` sends to the run once the server is back.

- ``uri``: the tracking URI, the runs page of the UI
- ``guard``: the one guarded MLflow call (an unreachable store costs seconds, never an error)
- ``runs``: start or reopen a run, tag it, log to it from the driver, end it; ``tracked_run``
- ``tracker``: logging from the rank-0 worker, with the local fallback
- ``sync``: the offline record and ``sdofm mlflow sync``
- ``figures``: matplotlib figures (no MLflow)
- ``models``: log a torch module as a model of its run, load one back

MLflow itself is imported only where a call needs it: importing this package is cheap.
"""

from sdofm.tracking.figures import (
    forecast_figure,
    pyplot,
    reconstruction_figure,
    samples_figure,
)
from sdofm.tracking.guard import guarded
from sdofm.tracking.models import load_model, log_model, model_location
from sdofm.tracking.runs import (
    CHECKPOINT_TAG,
    CONFIG_ARTIFACT,
    MODEL_URI_TAG,
    STOPPED_TAG,
    Run,
    end_run,
    find_run,
    flatten,
    log_metrics,
    log_skipped,
    log_text,
    section_params,
    set_tags,
    start_run,
    tracked_run,
)
from sdofm.tracking.sync import fallback_dir, send_records, sync
from sdofm.tracking.tracker import Tracker
from sdofm.tracking.uri import runs_page, tracking_uri

__all__ = [
    "CHECKPOINT_TAG",
    "CONFIG_ARTIFACT",
    "MODEL_URI_TAG",
    "STOPPED_TAG",
    "Run",
    "Tracker",
    "end_run",
    "fallback_dir",
    "find_run",
    "flatten",
    "forecast_figure",
    "guarded",
    "load_model",
    "log_metrics",
    "log_model",
    "log_skipped",
    "log_text",
    "model_location",
    "pyplot",
    "reconstruction_figure",
    "runs_page",
    "samples_figure",
    "section_params",
    "send_records",
    "set_tags",
    "start_run",
    "sync",
    "tracked_run",
    "tracking_uri",
]
