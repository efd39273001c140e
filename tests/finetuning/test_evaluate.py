"""`sdofm evaluate`: paired bootstrap verdicts, and the board against the engine's own scores."""

from __future__ import annotations

import numpy as np
from mlflow import MlflowClient

from sdofm.config import load_config
from sdofm.finetuning.evaluate import ARMS, board_rows, bootstrap, evaluate, format_board
from tests.conftest import small_config
from tests.finetuning.test_dimming import _checkpoint


def _mae(s):
    return {"mae": float(s["err"].mean())}


def test_paired_bootstrap_tells_a_real_gain_from_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 0.2, (400, 3))
    scores = {
        "pretrained": {"err": base * 0.8},  # 20 % better on every sample
        "random_init": {"err": base},
        "from_scratch": {"err": base + rng.normal(0, 0.001, base.shape)},
    }
    point, draws = bootstrap(_mae, scores, 300, seed=1)
    assert point["random_init"]["mae"] == base.mean()
    (row,) = board_rows("t", point, draws, [("mae", False)])
    assert row["beats_random_init"] and row["beats_from_scratch"]
    lo, hi = row["pretrained_ci"]
    assert lo < base.mean() * 0.8 < hi
    # The same scores in every arm: no arm beats another.
    same = {a: {"err": base} for a in ARMS}
    (row,) = board_rows("t", *bootstrap(_mae, same, 300, seed=1), [("mae", False)])
    assert not row["beats_random_init"] and not row["beats_from_scratch"]
    # Higher-is-better metrics flip the sign.
    acc = {a: {"err": (s["err"] < 0.05).astype(float)} for a, s in scores.items()}
    (row,) = board_rows("t", *bootstrap(_mae, acc, 300, seed=1), [("mae", True)])
    assert row["beats_random_init"]  # pretrained has more errors below 0.05


def test_evaluate_scores_three_arms_on_the_test_split(synth_root, tmp_path, ray_session):
    _checkpoint(tmp_path / "backbone", channels=load_config().data.channels)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = small_config(
        synth_root,
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={db}",
        f"finetune.backbone={tmp_path / 'backbone'}",
        "finetune.head=pool",
        "finetune.epochs=1",
        "finetune.batch_size=32",
        "loader.readers=1",
        "scaling.cpus_per_worker=0.25",
    )
    board = evaluate(cfg, ["dimming"], n_boot=100)
    assert [r["metric"] for r in board.rows] == ["mae", "success_0.05", "success_0.1"]
    text = format_board(board)
    assert "mae (down)" in text and "beats random" in text

    client = MlflowClient(db)
    parent = client.get_run(board.run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{board.run_id}'"
    )
    by_arm = {c.data.tags["sdofm.arm"]: c for c in children}
    assert set(by_arm) == set(ARMS)
    mae = next(r for r in board.rows if r["metric"] == "mae")
    for arm, run in by_arm.items():
        assert run.info.status == "FINISHED"
        # The board's per-sample path agrees with the engine's own test evaluation.
        assert abs(mae[arm] - run.data.metrics["test/mae"]) < 1e-5, arm
        assert parent.data.metrics[f"dimming/{arm}/mae"] == mae[arm]
