"""Science heads on a pretrained backbone: tasks (``tasks/``), backbone resolution, one
driver for single runs (``run.py``) and Ray Tune sweeps (``tune.py``)."""
