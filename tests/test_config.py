import datetime as dt
from pathlib import Path

import pytest
import yaml

from sdofm.config import Config, ConfigError, dump_config, load_config, parse_duration

CONFIGS = Path(__file__).parent.parent / "configs"


def test_defaults_equal_the_synthetic_config_file():
    assert dump_config(load_config(CONFIGS / "data" / "synthetic.yaml")) == dump_config(Config())


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_dotted_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "data.cadence=24min",
            "data.num_frames=3",
            "data.aia_channels=[171A, 193A]",
            "data.start=2011-01-02",
            "synth.overwrite=true",
        ],
    )
    assert cfg.data.cadence == dt.timedelta(minutes=24)
    assert cfg.data.effective_tolerance == dt.timedelta(minutes=12)
    assert cfg.data.num_frames == 3
    assert cfg.data.aia_channels == ["171A", "193A"]
    assert cfg.data.start == dt.datetime(2011, 1, 2)
    assert cfg.synth.overwrite is True


@pytest.mark.parametrize(
    "text,seconds", [("12min", 720), ("1h", 3600), ("30s", 30), ("2d", 172800), ("1.5 hours", 5400)]
)
def test_durations(text, seconds):
    assert parse_duration(text).total_seconds() == seconds
    assert parse_duration(
        dump_config(load_config(None, [f"data.cadence={text}"]).data)["cadence"]
    ) == parse_duration(text)


def test_misspelt_key_in_file_names_key_value_file_and_suggests(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  cadnce: 24min\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert (
        "data.cadnce" in msg
        and "24min" in msg
        and str(path) in msg
        and "did you mean 'cadence'" in msg
    )


def test_misspelt_override_names_the_override():
    with pytest.raises(ConfigError, match=r"data\.split\.val_month.*did you mean 'val_months'"):
        load_config(None, ["data.split.val_month=[10]"])


def test_wrong_type_names_key_value_and_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("synth:\n  resolution: big\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert (
        "synth.resolution" in str(e.value) and "'big'" in str(e.value) and str(path) in str(e.value)
    )


def test_bad_duration_and_unknown_channel_are_errors():
    with pytest.raises(ConfigError, match="data.cadence = '12 parsecs'"):
        load_config(None, ["data.cadence=12 parsecs"])
    with pytest.raises(ConfigError, match="unknown channel '172A'"):
        load_config(None, ["data.aia_channels=[171A, 172A]"])


def test_extends_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"cadence": "24min", "root": "a"}}))
    (tmp_path / "top.yaml").write_text("extends: base.yaml\ndata:\n  root: b\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.data.root == "b" and cfg.data.cadence == dt.timedelta(minutes=24)


def test_extends_a_list_merges_in_order_then_the_file_itself(tmp_path):
    """A model config and a data archive combined: later bases win, the file wins last."""
    (tmp_path / "model.yaml").write_text("data:\n  cadence: 24min\n  root: a\n")
    (tmp_path / "archive.yaml").write_text("data:\n  root: b\n  num_frames: 3\n")
    (tmp_path / "top.yaml").write_text(
        "extends: [model.yaml, archive.yaml]\ndata:\n  num_frames: 2\n"
    )
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.data.root == "b" and cfg.data.cadence == dt.timedelta(minutes=24)
    assert cfg.data.num_frames == 2


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_eve_default_expands_to_38_lines():
    cfg = load_config(None, ["data.eve_lines=default"])
    assert len(cfg.data.eve_lines) == 38 and "Fe XVI_2" not in cfg.data.eve_lines


def test_a_bare_on_key_is_named_with_the_fix(tmp_path):
    """YAML 1.1 reads ``on:`` as ``true:``; pydantic would say "Keys should be strings"."""
    path = tmp_path / "c.yaml"
    path.write_text("transform:\n  on: device\n")
    with pytest.raises(ConfigError, match=r'under transform came out so: quote it.*"on": device'):
        load_config(path, [])
    path.write_text('transform:\n  "on": device\n')
    assert load_config(path, []).transform.on == "device"
