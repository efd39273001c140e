"""Which pretrained encoder a head sits on: a checkpoint folder, a ``models:/`` URI, an
MLflow run id, or the newest finished pretraining run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdofm.config import Config, ConfigError
from sdofm.engine.checkpoint import MODEL_FILE, STATE_FILE
from sdofm.models import FAMILIES, encoder_class, family_of_encoder
from sdofm.storage import open_url
from sdofm.tracking import CHECKPOINT_TAG, load_model


@dataclass
class Backbone:
    """A pretrained encoder: its constructor arguments, weights, and where it came from."""

    encoder_config: dict
    state_dict: dict
    source: str
    family: str
    """The model family whose encoder this is (a key of ``sdofm.models.FAMILIES``)."""
    run_id: str | None = None
    channels: list[str] | None = None
    model: tuple[str, dict] | None = None
    """(flavour, constructor arguments) of the whole pretrained model, decoder included,
    where the checkpoint records them (the scoreboard scores its reconstructions)."""
    recorded: dict = field(default_factory=dict)
    """Everything else the checkpoint's ``state.json`` records (a forecaster's frame step)."""

    def encoder(self) -> nn.Module:
        """The encoder with these weights; only the keys its family's row lets a head ignore
        (the decoder) may be left unused."""
        enc = encoder_class(self.family)(**self.encoder_config)
        result = enc.load_state_dict(self.state_dict, strict=False)
        if result.missing_keys:
            raise ConfigError(f"{self.source}: encoder keys missing {result.missing_keys}")
        ignores = FAMILIES[self.family].head_ignores
        stray = [k for k in result.unexpected_keys if not k.startswith(ignores)]
        if stray:
            raise ConfigError(f"{self.source}: unexpected keys beside the decoder's {stray}")
        return enc

    def check(self, cfg: Config, sample_shape: tuple[int, int, int, int]) -> None:
        """A clear error when the backbone does not fit the data config."""
        C, T, H, _ = sample_shape
        ec = self.encoder_config
        img = ec["img_size"] if isinstance(ec["img_size"], int) else ec["img_size"][0]
        problems = []
        if self.channels is not None and list(self.channels) != list(cfg.data.channels):
            problems.append(f"channels {self.channels} vs data {cfg.data.channels}")
        elif ec["in_chans"] != C:
            problems.append(f"{ec['in_chans']} channels vs {C} in the data {cfg.data.channels}")
        if img != H:
            problems.append(f"image size {img} px vs {H} px from the data (transform.size)")
        if ec["num_frames"] != T:
            problems.append(f"{ec['num_frames']} frames vs data.num_frames {T}")
        if problems:
            raise ConfigError(
                f"backbone {self.source} does not match the data config: " + "; ".join(problems)
            )


def _from_checkpoint(
    path: str, source: str, run_id: str | None = None, storage_options: dict | None = None
) -> Backbone:
    fs, root = open_url(path, storage_options)
    try:
        with fs.open(f"{root}/{STATE_FILE}") as f:
            state = json.load(f)
        with fs.open(f"{root}/{MODEL_FILE}", "rb") as f:
            sd = torch.load(f, map_location="cpu")
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(
            f"{source}: not a pretraining checkpoint folder such as "
            f"<storage>/<run>/checkpoint_00000132 ({e})"
        ) from None
    family = state.get("encoder_family")
    if "encoder_config" not in state or family not in FAMILIES:
        raise ConfigError(
            f"{source}: the checkpoint does not record its encoder_config and encoder_family "
            f"(one of {', '.join(FAMILIES)})"
        )
    return Backbone(
        state["encoder_config"],
        sd,
        source,
        family,
        run_id or state.get("run_id"),
        state.get("channels"),
        (state["model_name"], state["model_config"]) if "model_name" in state else None,
        state,
    )


def resolve_backbone(
    spec: str | None, tracking_uri: str, experiment: str, storage_options: dict | None = None
) -> Backbone:
    """A backbone from a checkpoint folder, a ``models:/`` URI, an MLflow run id, or (None)
    the newest finished pretraining run of ``experiment``. ``storage_options``: fsspec
    options of a checkpoint URL (``train.storage_options``, where pretraining wrote it)."""
    from mlflow import MlflowClient

    if spec and spec.startswith(("models:/", "runs:/")):
        enc = load_model(tracking_uri, spec)
        family = family_of_encoder(enc)
        if family is None:
            known = ", ".join(encoder_class(f).__name__ for f in FAMILIES)
            raise ConfigError(f"{spec} is a {type(enc).__name__}, not an encoder ({known})")
        return Backbone(enc.encoder_config, enc.state_dict(), spec, family)
    if spec and ("/" in spec or Path(spec).exists()):
        return _from_checkpoint(spec, spec, storage_options=storage_options)
    client = MlflowClient(tracking_uri)
    if spec:
        try:
            run = client.get_run(spec)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"finetune.backbone {spec!r}: no such MLflow run at {tracking_uri} ({e})"
            ) from None
    else:
        exp = client.get_experiment_by_name(experiment)
        runs = (
            client.search_runs(
                [exp.experiment_id],
                filter_string="attributes.status = 'FINISHED' and tags.`sdofm.task` = 'pretrain'",
                order_by=["attributes.end_time DESC"],
                max_results=1,
            )
            if exp
            else []
        )
        if not runs:
            raise ConfigError(
                f"no finished pretraining run in MLflow experiment {experiment!r} at "
                f"{tracking_uri}: run `sdofm pretrain` first, or set finetune.backbone "
                "(a run id, a models:/ URI or a checkpoint folder)"
            )
        run = runs[0]
    ckpt = run.data.tags.get(CHECKPOINT_TAG)
    if not ckpt:
        raise ConfigError(f"MLflow run {run.info.run_id} records no checkpoint ({CHECKPOINT_TAG})")
    return _from_checkpoint(
        ckpt, f"run {run.info.run_id} ({ckpt})", run.info.run_id, storage_options
    )
