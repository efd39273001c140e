import json
import subprocess
import sys

from typer.testing import CliRunner

from sdofm.cli import app

runner = CliRunner()
SMALL = [
    "synth.resolution=16",
    "synth.periods=[{start: 2011-10-31, days: 2}]",
    "data.split.buffer=0s",
]


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from sdofm.cli import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'zarr', 'pandas', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
    r = runner.invoke(app, ["data", "--help"])
    assert r.exit_code == 0 and "synth" in r.output and "index" in r.output and "info" in r.output


def test_console_script_and_module_are_the_one_app():
    """`sdofm` (pyproject's script) and `python -m sdofm.cli` (cluster scripts, benchmarks)."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="sdofm")
    assert script.value == "sdofm.cli:app" and script.load() is app
    out = subprocess.run(
        [sys.executable, "-m", "sdofm.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("data", "pretrain", "finetune", "tune", "evaluate", "embed", "mlflow", "demo"):
        assert f" {command} " in out, command


def test_verbose_reaches_the_ray_start(tmp_path, monkeypatch):
    """The top-level --verbose is read when a command of another module starts Ray."""
    import sdofm.runtime

    calls = []

    def fake_init_ray(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("no Ray in this test")

    monkeypatch.setattr(sdofm.runtime, "init_ray", fake_init_ray)
    ingest = ["data", "ingest", str(tmp_path / "fits"), str(tmp_path), "--instrument", "aia"]
    for flags, verbose in (([], False), (["--verbose"], True), ([], False)):
        r = runner.invoke(app, [*flags, *ingest])
        assert str(r.exception) == "no Ray in this test", r.output
        assert calls.pop() == {"verbose": verbose, "dashboard": False}


def test_synth_info_index(tmp_path):
    args = [f"data.root={tmp_path / 'sdoml'}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL]
    r = runner.invoke(app, ["data", "synth", *args])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "MiB" in r.output
    r = runner.invoke(app, ["data", "synth", *args])
    assert r.exit_code == 0 and "reused" in r.output
    r = runner.invoke(app, ["data", "info", *args, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert list(info["aia"]["years"]) == ["2011"] and len(info["aia"]["years"]["2011"]) == 9
    assert info["hmi"]["years"]["2011"]["Bz"]["shape"] == [16, 16] and info["eve"]["lines"] == 39
    r = runner.invoke(app, ["data", "info", *args])
    assert r.exit_code == 0 and "blosc zstd 5 bit-shuffle" in r.output and "171A" in r.output
    r = runner.invoke(app, ["data", "index", *args])
    assert r.exit_code == 0, r.output
    assert "built index" in r.output and "(train" in r.output
    r = runner.invoke(app, ["data", "index", *args])
    assert r.exit_code == 0 and "reused index" in r.output


def test_config_file_and_errors(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("data:\n  cadnce: 24min\n")
    r = runner.invoke(app, ["data", "index", str(cfg)])
    assert r.exit_code == 2
    assert (
        "data.cadnce" in r.output
        and "did you mean 'cadence'" in r.output
        and "Traceback" not in r.output
    )
    r = runner.invoke(app, ["data", "info", f"data.root={tmp_path / 'empty'}"])
    assert r.exit_code == 2 and "no AIA store under" in r.output
    r = runner.invoke(app, ["evaluate", "--task", "none", "--heads-only"])
    assert r.exit_code == 2 and "--heads-only with --task none scores nothing" in r.output


def test_stats_on_an_empty_train_split_is_a_clear_error(tmp_path, ray_session):
    args = [
        f"data.root={tmp_path / 'sdoml'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *SMALL,
        "data.split.val_months=[10]",
        "data.split.test_months=[11]",
    ]
    assert runner.invoke(app, ["data", "synth", *args]).exit_code == 0
    r = runner.invoke(app, ["data", "stats", *args])
    assert r.exit_code == 2 and "the train split is empty" in r.output, r.output


def test_demo_runs_end_to_end(synth_root, tmp_path, ray_session):
    """The main job, scaled down: data, index, statistics, pretraining, a 1-trial sweep."""
    from tests.conftest import SMALL as SESSION_STORE

    r = runner.invoke(
        app,
        [
            "demo",
            *SESSION_STORE,
            f"data.root={synth_root}",  # the same synth settings: reused, not rewritten
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.system_metrics=false",
            "model.name=mae_debug",
            "loader.readers=1",
            "scaling.cpus_per_worker=0.25",
            "train.max_steps=4",
            "train.checkpoint_every=4",
            "train.val_every=4",
            "finetune.epochs=1",
            "finetune.max_train_samples=64",
            "tune.num_samples=1",
            "tune.grace_period=1",
        ],
        terminal_width=200,
    )
    assert r.exit_code == 0, r.output
    out = r.output
    assert "already match" in out and "built index" in out and "HMI" in out and "EVE" in out
    assert "statistics of" in out and "pretraining mae_debug" in out
    assert "where to look" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {e.name: client.search_runs([e.experiment_id]) for e in client.search_experiments()}
    assert [x.info.status for x in runs["sdofm-pretrain"]] == ["FINISHED"]
    assert len(runs["sdofm-dimming"]) == 2  # the sweep's parent and its one trial


def test_skipped_frames_are_counted_and_reported_by_stats_and_pretrain(
    synth_copy, tmp_path, ray_session
):
    """A garbage chunk and NaN frames in a copy of the store: `data stats` counts the samples
    it used, and `pretrain` prints and logs the frames it skipped, checked by hand."""
    import numpy as np
    import zarr
    from mlflow import MlflowClient

    from sdofm.datasets.index import build_index
    from tests.conftest import SMALL as SESSION_STORE
    from tests.conftest import small_config

    window = ["data.end=2012-06-30T00:00:00", "data.aia_channels=[171A, 304A]"]
    args = [
        *SESSION_STORE,
        *window,
        f"data.root={synth_copy}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.system_metrics=false",
        "tracking.log_model=false",
        "model.name=mae_debug",
        "loader.readers=1",
        "loader.block_size=16",
        "scaling.cpus_per_worker=0.25",
        "train.epochs=1",
        "train.val_every=1000",
    ]
    cfg = small_config(synth_copy, *window)
    table, _ = build_index(cfg.data)
    rows = table[(table["split"] == "train") & (table["171A_year"] == 2012)]
    used = np.sort(rows["171A_idx"].to_numpy())
    a = zarr.open_array(synth_copy / "sdomlv2.zarr" / "2012" / "171A", mode="r+", zarr_format=2)
    nan_frames = [int(used[3]), int(used[30])]
    for i in nan_frames:
        lo = i // 8 * 8
        block = a[lo : lo + 8]
        block[i - lo] = np.nan
        a[lo : lo + 8] = block
    garbage = int(used[60]) // 8
    (synth_copy / "sdomlv2.zarr" / "2012" / "171A" / f"{garbage}.0.0").write_bytes(b"garbage")
    # By hand: the damaged frames the train split uses, and its samples (T=1: rows) using them.
    bad = {int(i) for i in used if i in nan_frames or i // 8 == garbage}
    n_train, lost = len(used), int(rows["171A_idx"].isin(bad).sum())
    assert len(bad) >= 3 and lost >= len(bad)

    r = runner.invoke(app, ["data", "stats", *args], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert f"statistics of {n_train - lost:,} train samples" in r.output
    assert f"{len(bad)} unusable frame(s) skipped; {lost} train sample(s) left out" in r.output

    r = runner.invoke(app, ["pretrain", *args], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert f"{len(bad)} unusable frame(s) skipped; {lost} sample(s) left out ({lost} train)" in (
        r.output
    )
    assert "skipped frames" in r.output and f"cannot decode chunk {garbage}.0.0" in r.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == cfg.tracking.experiment]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["data/skipped_frames"] == len(bad)
    assert run.data.metrics["data/skipped_samples"] == lost
    path = client.download_artifacts(run.info.run_id, "skipped_frames.json", str(tmp_path))
    logged = json.loads(open(path).read())
    frames = [row[logged["columns"].index("frame")] for row in logged["data"]]
    assert sorted(frames) == sorted(bad)
