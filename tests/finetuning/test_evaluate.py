"""`sdofm evaluate`: paired bootstrap verdicts, and the board against the engine's own scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from sdofm.config import load_config
from sdofm.datasets.index import load_or_build_index
from sdofm.datasets.pipeline import SDOMLPipeline
from sdofm.datasets.stats import load_or_compute_stats
from sdofm.engine.checkpoint import TrainState, save_checkpoint
from sdofm.engine.objective import EvalContext
from sdofm.finetuning.evaluate import (
    ARMS,
    RECONSTRUCTION,
    board_rows,
    bootstrap,
    evaluate,
    format_board,
)
from sdofm.finetuning.run import Prepared
from sdofm.finetuning.tasks import get_task
from sdofm.finetuning.tasks.dimming import Dimming
from sdofm.finetuning.tasks.missing_channel import withhold
from sdofm.models import get_model
from sdofm.pretraining.objective import make_objective
from tests.conftest import small_config
from tests.finetuning.test_dimming import STATS, _physical


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


def test_day_blocks_widen_intervals_where_a_days_samples_share_their_sun():
    """400 samples on 10 days whose errors are set by the day alone: resampling samples
    pretends they are 400 independent scores; resampling days gives the spread of 10."""
    rng = np.random.default_rng(2)
    days = np.repeat(np.arange(10), 40)
    per_day = rng.uniform(0.05, 0.15, 10)
    scores = {"pretrained": {"err": per_day[days][:, None]}}
    width = {}
    for unit, d in (("samples", None), ("days", days)):
        point, draws = bootstrap(_mae, scores, 500, seed=3, days=d)
        lo, hi = np.percentile(draws["pretrained"]["mae"], [2.5, 97.5])
        assert point["pretrained"]["mae"] == pytest.approx(per_day.mean())
        width[unit] = hi - lo
    assert width["days"] > 4 * width["samples"]  # sqrt(40) = 6.3 by the closed form
    # Fewer than MIN_DAYS days: samples are resampled (and the board says so).
    few = bootstrap(_mae, scores, 500, seed=3, days=np.repeat(np.arange(4), 100))
    assert np.array_equal(
        few[1]["pretrained"]["mae"], bootstrap(_mae, scores, 500, seed=3)[1]["pretrained"]["mae"]
    )


def test_a_gain_that_one_head_seed_makes_is_no_verdict():
    """The pretrained arm's three seeds average 3 % better, all of it from one lucky seed:
    stacked as one run it would beat on every resample of the days; resampling the seeds
    shows it may as well be worse."""
    rng = np.random.default_rng(4)
    days = np.repeat(np.arange(20), 10)
    base = rng.uniform(0.05, 0.15, (200, 3))
    scores = {
        "pretrained": [{"err": base * f} for f in (0.5, 1.3, 1.1)],
        "random_init": [{"err": base}] * 3,
        "from_scratch": [{"err": base * 2}] * 3,
    }
    point, draws = bootstrap(_mae, scores, 400, seed=5, days=days)
    assert point["pretrained"]["mae"] == pytest.approx(base.mean() * 2.9 / 3)
    (row,) = board_rows("t", point, draws, [("mae", False)])
    assert not row["beats_random_init"]  # the seeds' spread covers zero gain
    assert row["beats_from_scratch"]  # every seed is far better than half as good
    # The same three heads, each seed as good as the mean: the gain holds.
    steady = {**scores, "pretrained": [{"err": base * 2.9 / 3}] * 3}
    (row,) = board_rows("t", *bootstrap(_mae, steady, 400, seed=5, days=days), [("mae", False)])
    assert row["beats_random_init"]


class _Split:
    """Rows of a split, served as a Ray Dataset (the driver) or a worker's shard of one."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str):
        assert batch_format == "numpy"
        n = len(next(iter(self.rows.values())))
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in self.rows.items()}

    def select_columns(self, columns):
        return _Split({c: self.rows[c] for c in columns})


def _split(n: int, seed: int, **columns) -> _Split:
    """n rows of sample ids out of order (as the readers deliver them), times, and ``columns``."""
    ids = np.random.default_rng(seed).permutation(3 * n)[:n]
    times = (ids.astype(np.int64) * 720 * 10**9)[:, None]
    return _Split({"sample": ids, "time": times, **columns})


def _eve(n: int, seed: int) -> np.ndarray:
    """(n, 2, 1) EVE irradiances in W m^-2 with EVE's gaps: -1, NaN and 0."""
    rng = np.random.default_rng(seed)
    eve = 10 ** rng.normal([-4.0, -3.0], 0.2, (n, 2))
    eve[rng.random((n, 2)) < 0.2] = -1.0
    eve[0, 1], eve[1, 0] = np.nan, 0.0
    return eve[:, :, None].astype(np.float32)


def _task_data(task: str):
    """-> (config, prepared) of a small test split (and a train split for EVE's statistics)."""
    rng = np.random.default_rng(1)
    common = ["finetune.head=baseline_cnn", "finetune.hidden=32", "finetune.batch_size=4"]
    if task == "dimming":
        # Tolerances far from the default: the board's success must follow the config.
        cfg = load_config(None, [*common, "finetune.success_tolerance=[0.2, 0.3]"])
        splits = {"test": _split(10, 0, image=_physical(10, 16))}
    elif task == "eve":
        cfg = load_config(None, [*common, "data.eve_lines=[He II, Fe IX]"])
        image = rng.normal(size=(22, 12, 1, 16, 16)).astype(np.float32)
        splits = {
            "train": _split(12, 1, image=image[:12], eve=_eve(12, 1)),
            "test": _split(10, 2, image=image[12:], eve=_eve(10, 2)),
        }
    else:
        cfg = load_config(None, [*common, "finetune.held_out=[94A, Bz]"])
        image = rng.normal(size=(10, 12, 1, 16, 16)).astype(np.float32)
        image[4, 11] = 0.5  # a flat Bz: its correlation is NaN, left out of the means
        splits = {"test": _split(10, 3, image=image)}
    return cfg, Prepared((12, 1, 16, 16), STATS, None, splits, {}, "")


@pytest.mark.parametrize("name", ["dimming", "eve", "missing-channel"])
def test_the_board_scores_a_head_as_the_engine_logs_it(name):
    """The scoreboard's per-sample scores and metrics and the engine's ``test/...`` metrics
    (MLflow) of the same head on the same test split are equal, bit for bit."""
    import matplotlib.pyplot as plt

    task = get_task(name)
    cfg, prepared = _task_data(name)
    objective = task.objective(cfg, prepared)
    torch.manual_seed(0)
    model = objective.build_model()  # in train mode, as the loop hands it over
    ctx = EvalContext(torch.device("cpu"), cfg.finetune.batch_size, 1, "fp32", 0, 0, True, 1)
    engine = objective.evaluate(model, prepared.datasets["test"], "test", ctx)
    assert model.training  # given back as it came
    assert len(engine.figures) == 1
    plt.close(engine.figures[0][1])

    scores = task.test_scores(cfg, prepared, model)
    n = len(prepared.datasets["test"].rows["sample"])
    assert {len(v) for v in scores.values()} == {n}
    board = task.summarise(cfg, scores)
    assert list(board) == [m for m, _ in task.board(cfg)]
    for metric, value in board.items():
        assert np.isfinite(value), metric
        assert value == engine.metrics[f"test/{metric}"], metric

    # The board's rows are the test samples in sample order, as the bootstrap pairs them.
    ids = prepared.datasets["test"].rows["sample"]
    x = prepared.datasets["test"].rows["image"]
    order = np.argsort(ids)
    model.eval()
    with torch.no_grad():
        if name == "dimming":
            # the share within the config's first tolerance, by hand
            inputs, alpha = Dimming(cfg, STATS, 16)(x, ids, "test", 0)
            err = np.abs(model(torch.from_numpy(inputs)).numpy() - alpha)
            np.testing.assert_array_equal(scores["abs_err"], err[order])
            assert [m for m, _ in task.board(cfg)] == ["mae", "success_0.2", "success_0.3"]
            for tol in (0.2, 0.3):
                assert board[f"success_{tol}"] == pytest.approx((err < tol).mean())
            assert engine.metrics["test/success"] == board["success_0.2"]
            assert 0 < board["success_0.2"] < 1 and (err < 0.05).mean() < board["success_0.2"]
            assert [m for m, _ in task.board(load_config())] == [
                "mae",
                "success_0.05",
                "success_0.1",
            ]
        elif name == "eve":
            masked = (~np.isfinite(scores["rel"])).sum()
            assert masked == engine.metrics["test/masked"] > 0
        else:
            inputs, y = withhold(x, [0, 11])
            sq = ((model(torch.from_numpy(inputs)).numpy() - y) ** 2).mean(axis=(2, 3, 4))
            np.testing.assert_allclose(scores["mse"], sq[order], rtol=1e-6)
            assert np.isnan(scores["scores"][:, 1, 2]).sum() == 1
            for k, c in enumerate(["94A", "Bz"]):
                per = np.nanmean(scores["scores"][:, k], axis=0)
                for j, col in enumerate(("psnr", "ssim", "corr")):
                    assert engine.metrics[f"test/{col}_{c}"] == pytest.approx(per[j])


def _images(pipe, split):
    """split -> (sample ids, images (n, C, T, H, W)) in sample order."""
    ids, imgs = [], []
    for b in pipe.dataset(split, epoch=0).iter_batches(batch_size=64, batch_format="numpy"):
        ids.append(b["sample"])
        imgs.append(b["image"])
    order = np.argsort(np.concatenate(ids))
    return np.concatenate(ids)[order], np.concatenate(imgs)[order]


def _pretrain_briefly(cfg, path, steps=300):
    """mae_debug pretrained by a plain loop on the session store's train split (the
    pretraining objective's loss; the Ray Train loop would cost half a minute more), saved
    as pretraining saves it. -> (the model, the pipeline of the pretraining transform)."""
    table, _ = load_or_build_index(cfg.data)
    stats = load_or_compute_stats(cfg.data, cfg.transform, cfg.loader, table)
    pipe = SDOMLPipeline(cfg.data, cfg.transform, cfg.loader, table, stats)
    objective = make_objective(cfg, pipe.sample_shape())
    _, train = _images(pipe, "train")
    torch.manual_seed(0)
    model = objective.build_model()
    opt = objective.optimizers(model)["model"]
    for group in opt.param_groups:
        group["lr"] = 2e-3
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: two threads beside Ray's cost 100x here
    try:
        for _ in range(steps):
            x = torch.from_numpy(train[rng.integers(0, len(train), 16)])
            loss = objective.loss(model, {"image": x}, None, "model", torch.device("cpu"))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(
        path, model, {"model": opt}, TrainState(steps, 0, 0), objective.checkpoint_meta(model)
    )
    return model.eval(), pipe, objective


def _masked_mse_by_hand(imgs, pred, mask, p):
    """imgs (n, C, 1, H, W), pred (n, L, p*p*C) with pixels ordered (row, col, channel),
    mask (n, L) -> (n, C): each sample's squared error per channel, averaged over the
    pixels of its masked patches (patches numbered row-major over a (H/p, W/p) grid)."""
    n, C, _, H, W = imgs.shape
    cols = W // p
    out = np.zeros((n, C))
    for i in range(n):
        masked = np.flatnonzero(mask[i])
        for patch in masked:
            r, c = divmod(patch, cols)
            true = imgs[i, :, 0, r * p : (r + 1) * p, c * p : (c + 1) * p]  # (C, p, p)
            guess = pred[i, patch].reshape(p, p, C).transpose(2, 0, 1)
            out[i] += ((guess - true) ** 2).mean(axis=(1, 2))
        out[i] /= len(masked)
    return out


def test_evaluate_scores_three_arms_on_the_test_split(synth_root, tmp_path, ray_session):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = small_config(
        synth_root,
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={db}",
        f"finetune.backbone={tmp_path / 'backbone'}",
        "model.name=mae_debug",
        "finetune.head=pool",
        "finetune.epochs=1",
        "finetune.batch_size=32",
        "finetune.head_seeds=2",
        "loader.readers=1",
        "scaling.cpus_per_worker=0.25",
    )
    pretrained, pipe, objective = _pretrain_briefly(cfg, tmp_path / "backbone")
    board = evaluate(cfg, ["dimming"], n_boot=100)
    rows = [r for r in board.rows if r["task"] == "dimming"]
    assert [r["metric"] for r in rows] == ["mae", "success_0.05", "success_0.1"]
    text = format_board(board)
    assert "mae (down)" in text and "beats random" in text
    assert "reconstruction: the backbone itself on the test split" in text
    # --heads-only: the same backbone, its own sections not scored, and said so.
    heads = evaluate(cfg, [], n_boot=100, heads_only=True)
    assert heads.rows == [] and heads.generation is None and heads.forecast is None
    assert "backbone: not scored (only the heads asked for)" in format_board(heads)

    # The backbone's masked reconstruction, per channel, equals a computation by hand of
    # the squared error on the masked patches of every test sample, for both arms.
    channels = cfg.data.channels
    recon = {r["metric"]: r for r in board.rows if r["task"] == RECONSTRUCTION}
    assert list(recon) == [f"masked_mse_{c}" for c in [*channels, "mean"]]
    ids, imgs = _images(pipe, "test")
    torch.manual_seed(cfg.train.seed)
    random_model = get_model("mae_debug", img_size=32, in_chans=12, num_frames=1).eval()
    by_hand = {}
    with torch.no_grad():
        x = torch.from_numpy(imgs)
        out = objective.masked_forward(pretrained, x, ids)
        out_random = objective.masked_forward(random_model, x, ids)
    mask = out["mask"].numpy()
    assert (mask.sum(1) == 12).all() and len({m.tobytes() for m in mask}) > 1  # 75 % of 16
    assert np.array_equal(out_random["mask"].numpy(), mask)  # paired: the same masks
    for arm, o in (("pretrained", out), ("random_init", out_random)):
        by_hand[arm] = _masked_mse_by_hand(imgs, o["pred"].numpy(), mask, 8).mean(axis=0)
        for c, v in zip(channels, by_hand[arm], strict=True):
            np.testing.assert_allclose(recon[f"masked_mse_{c}"][arm], v, rtol=1e-4)
        np.testing.assert_allclose(recon["masked_mse_mean"][arm], by_hand[arm].mean(), rtol=1e-4)
    # Pretraining helps where it should: the pretrained backbone beats its random twin on
    # every AIA channel, beyond the bootstrap interval.
    for c in cfg.data.aia_channels:
        assert recon[f"masked_mse_{c}"]["beats_random_init"], (c, recon[f"masked_mse_{c}"])
        assert "beats_from_scratch" not in recon[f"masked_mse_{c}"]

    client = MlflowClient(db)
    parent = client.get_run(board.run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{board.run_id}'"
    )
    by_arm: dict[str, list] = {}
    for c in children:
        by_arm.setdefault(c.data.tags["sdofm.arm"], []).append(c)
    assert set(by_arm) == set(ARMS)
    mae = next(r for r in board.rows if r["metric"] == "mae")
    for arm, runs in by_arm.items():
        assert sorted(r.data.params["head_seed"] for r in runs) == ["0", "1"]
        assert all(r.info.status == "FINISHED" for r in runs)
        # The board's per-sample path agrees with the engine's own test evaluation: its
        # value pools both seeds' test samples, the mean of the two runs' test/mae.
        engine = np.mean([r.data.metrics["test/mae"] for r in runs])
        assert abs(mae[arm] - engine) < 1e-5, arm
        assert parent.data.metrics[f"dimming/{arm}/mae"] == mae[arm]
    assert "only 1 test day" in text  # the session store: intervals over samples, flagged
    assert "x 2 head seeds" in text
    for arm in ("pretrained", "random_init"):
        key = f"{RECONSTRUCTION}/{arm}/masked_mse_171A"
        assert parent.data.metrics[key] == recon["masked_mse_171A"][arm]
    # The whole resolved config travels with the run, as with every other run.
    logged = client.download_artifacts(board.run_id, "config.yaml", str(tmp_path / "cfg"))
    assert (
        yaml.safe_load(Path(logged).read_text())["finetune"]["head"] == cfg.finetune.head == "pool"
    )
