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


def test_demo_runs_end_to_end(tmp_path, ray_session):
    r = runner.invoke(
        app,
        ["demo", f"data.root={tmp_path / 'sdoml'}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL],
    )
    assert r.exit_code == 0, r.output
    assert (
        "wrote" in r.output
        and "built index" in r.output
        and "HMI" in r.output
        and "EVE" in r.output
    )
