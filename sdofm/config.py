"""Typed configuration: one pydantic model per concern, extra keys forbidden.

A config file is YAML with one top-level section per concern (``data:``, ``synth:``).
It may name a base file with ``extends: other.yaml`` (relative to itself), or several
(``extends: [model.yaml, ../data/benchmark.yaml]``, later ones winning); the sections are
merged key by key, the extending file winning. Dotted overrides
(``data.cadence=24min``) are applied last. Any unknown key or wrong type is a
:class:`ConfigError` that names the key, the value and the file it came from.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from sdofm.constants import AIA_CHANNELS, EVE_LINES_USED, HMI_CHANNELS
from sdofm.models.flavours import FLAVOURS


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# --------------------------------------------------------------------------- durations

_DURATION_RE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(d|days?|h|hours?|min|mins|m|minutes?|s|sec|seconds?)\s*$"
)
_UNIT_SECONDS = {"d": 86400, "h": 3600, "min": 60, "m": 60, "s": 1, "sec": 1}


def parse_duration(value: Any) -> dt.timedelta:
    """Parse ``"12min"``, ``"1h"``, ``"30s"``, ``"2d"`` (or a timedelta) into a timedelta."""
    if isinstance(value, dt.timedelta):
        return value
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            unit = m.group(2)
            unit = {
                "day": "d",
                "days": "d",
                "hour": "h",
                "hours": "h",
                "mins": "min",
                "minute": "min",
                "minutes": "min",
                "second": "s",
                "seconds": "s",
            }.get(unit, unit)
            return dt.timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[unit])
    raise ValueError(f"not a duration: {value!r} (write e.g. '12min', '1h', '30s', '2d')")


def format_duration(value: dt.timedelta) -> str:
    """The inverse of :func:`parse_duration` for whole seconds: 720 s -> ``"12min"``."""
    s = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{s:g}s"


Duration = Annotated[
    dt.timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data


def month_of(m: int | str) -> tuple[int | None, int]:
    """A split's month entry -> (year or None for every year, month 1-12)."""
    if isinstance(m, str):
        try:
            when = dt.datetime.strptime(m, "%Y-%m")
        except ValueError:
            raise ValueError(f"month {m!r} is neither 1..12 nor YYYY-MM") from None
        return when.year, when.month
    if not 1 <= m <= 12:
        raise ValueError(f"month {m} is not in 1..12")
    return None, m


class SplitConfig(_Section):
    """How aligned time steps are assigned to train / val / test."""

    method: Literal["month", "block"] = "month"
    """``month``: whole calendar months (SDO-FM); ``block``: contiguous time blocks."""
    val_months: list[int | str] = [11]
    """Months held out for validation with ``method: month``: 1-12 (that month of every
    year) or ``"YYYY-MM"`` (that month only)."""
    test_months: list[int | str] = [12]
    """Months held out for test with ``method: month``, as ``val_months``."""
    block: Duration = dt.timedelta(days=7)
    """Length of one block with ``method: block``."""
    val_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of blocks for validation with ``method: block``."""
    test_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of blocks for test with ``method: block``."""
    buffer: Duration = dt.timedelta(hours=6)
    """Steps this close to a boundary between different splits are dropped (no leakage)."""
    seed: int = 0
    """Seed of the block assignment."""

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        val = [month_of(m) for m in self.val_months]
        test = [month_of(m) for m in self.test_months]
        if any(  # the same month, in a year both name (None: every year)
            mv == mt and (yv is None or yt is None or yv == yt) for yv, mv in val for yt, mt in test
        ):
            raise ValueError("val_months and test_months overlap")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class DataConfig(_Section):
    """Where the SDOML stores are and which aligned samples to build from them."""

    root: str = "data/synthetic"
    """Folder or fsspec URL holding the stores (``s3://gov-nasa-hdrl-data1/.../fdl-sdoml-v2``)."""
    aia_store: str | None = None
    """AIA store name under ``root`` (or a full URL); None finds ``sdomlv2*.zarr`` or ``AIA.zarr``."""
    hmi_store: str | None = None
    """HMI store name or URL; None finds ``sdomlv2_hmi*.zarr`` or ``HMI.zarr``."""
    eve_store: str | None = None
    """EVE store name or URL; None finds ``sdomlv2_eve.zarr`` or ``EVE_legacy.zarr``."""
    storage_options: dict[str, Any] = {}
    """Passed to fsspec (``{anon: true}`` for public S3, ``{requester_pays: true}`` for GCS)."""
    aia_channels: list[str] = list(AIA_CHANNELS)
    """AIA channels to use, in this order."""
    hmi_channels: list[str] = list(HMI_CHANNELS)
    """HMI components to use, in this order."""
    eve_lines: list[str] = []
    """EVE MEGS-A lines to align (empty: EVE not used). ``default`` = the 38 SDO-FM lines."""
    start: dt.datetime | None = None
    """First time (UTC) to index; None = the start of the stores."""
    end: dt.datetime | None = None
    """Last time (UTC) to index; None = the end of the stores."""
    cadence: Duration = dt.timedelta(minutes=12)
    """Spacing of the alignment grid."""
    tolerance: Duration | None = None
    """Largest |frame time - grid time| accepted; None = half the cadence."""
    num_frames: int = Field(1, ge=1)
    """Frames per sample (T); >1 gives windows of T steps contiguous in time."""
    frame_step: Duration | None = None
    """Time between the frames of a window; None = the cadence."""
    split: SplitConfig = SplitConfig()
    """Train / val / test assignment."""
    on_bad_header: Literal["skip", "raise"] = "skip"
    """Frames whose header is null or unparseable: skip and count them, or raise."""
    cache_dir: str = "data/cache"
    """Folder or URL (``s3://bucket/cache``: every node reaches it) for the index and statistics."""
    prepared: str | None = None
    """Folder or fsspec URL of prepared shards (``sdofm data prepare``): model-ready samples
    that every consumer reads instead of decoding the stores (``data.storage_options``
    reach it); they must have been prepared with this section's and ``transform``'s settings."""

    @model_validator(mode="before")
    @classmethod
    def _expand_eve_default(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("eve_lines") == "default":
            values = {**values, "eve_lines": list(EVE_LINES_USED)}
        return values

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.aia_channels and not self.hmi_channels:
            raise ValueError("select at least one AIA or HMI channel")
        for name, chosen, known in (
            ("aia_channels", self.aia_channels, AIA_CHANNELS),
            ("hmi_channels", self.hmi_channels, HMI_CHANNELS),
        ):
            for c in chosen:
                if c not in known:
                    raise ValueError(f"{name}: unknown channel {c!r}; known: {', '.join(known)}")
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"{name}: a channel is listed twice")
        if self.tolerance is not None and self.tolerance > self.cadence:
            raise ValueError("tolerance must not exceed the cadence")
        if self.start and self.end and self.start >= self.end:
            raise ValueError("start must be before end")
        return self

    @property
    def channels(self) -> list[str]:
        """All image channels, AIA then HMI."""
        return [*self.aia_channels, *self.hmi_channels]

    @property
    def effective_tolerance(self) -> dt.timedelta:
        return self.tolerance if self.tolerance is not None else self.cadence / 2

    @property
    def effective_frame_step(self) -> dt.timedelta:
        return self.frame_step if self.frame_step is not None else self.cadence


class Period(_Section):
    """A stretch of days to synthesise."""

    start: dt.date
    """First day (UTC)."""
    days: int = Field(ge=1)
    """Number of days."""


class SynthConfig(_Section):
    """The synthetic Sun written in the SDOML v2 layout (embedded default and test fixture)."""

    seed: int = 0
    """Everything (active regions, flares, noise, gaps) follows from this seed."""
    resolution: int = Field(64, ge=16)
    """Image size in pixels (SDOML v2 is 512)."""
    periods: list[Period] = [
        Period(start=dt.date(2011, 10, 1), days=6),
        Period(start=dt.date(2011, 11, 1), days=2),
        Period(start=dt.date(2011, 12, 1), days=2),
    ]
    """Stretches to write; the default spans train (Oct), val (Nov) and test (Dec) months."""
    aia_cadence: Duration = dt.timedelta(minutes=6)
    """AIA cadence (6 min in SDOML v2)."""
    hmi_cadence: Duration = dt.timedelta(minutes=12)
    """HMI cadence (12 min in SDOML v2)."""
    eve_cadence: Duration = dt.timedelta(minutes=1)
    """EVE MEGS-A cadence (1 min in SDOML v2)."""
    frames_per_chunk: int = Field(15, ge=1)
    """Frames per zarr chunk along time (15 as the SDOML v2 converter; the small store uses 120)."""
    missing_fraction: float = Field(0.01, ge=0, lt=0.5)
    """Share of frames dropped at random, per channel."""
    gaps_per_day: float = Field(0.3, ge=0)
    """Rate of instrument-wide data gaps (each 30 min to 3 h)."""
    flares_per_day: float = Field(2.0, ge=0)
    """Mean flare rate."""
    active_regions: int = Field(8, ge=0)
    """Active regions on the disk on average."""
    eve_missing_fraction: float = Field(0.02, ge=0, lt=1)
    """Share of EVE spectra (all lines) marked missing (-1)."""
    network_variability: float = Field(0.0, ge=0, le=1)
    """How strongly the quiet Sun follows a slowly varying magnetic network, s(t) of unit
    variance (periods of 8 to 60 days): each AIA channel's quiet level is scaled by
    1 + v w_c s(t) (w_c from 0.05 at 1700 A to 1 at 211 A), the HMI network's field by
    1 + v s(t), the EVE lines by 1 + v (0.5 + hot / 2) s(t). 0: a constant quiet Sun, whose
    brightness alone gives a dimming factor away; with v > 0 only the channels' relations
    (the HMI network above all, never dimmed) tell a dimmed channel from a quieter Sun."""
    eve_temperature_width: float = Field(0.0, ge=0, le=1)
    """The width, dex, of each coronal EVE line's contribution function (formation
    temperature 10^6 K or hotter): an active region adds to that line only where its hidden
    temperature (log T from 6.0 to 7.0 across the regions' range, the one the AIA
    channels' responses see) lies within about this of the line's, as a Gaussian in log T
    normalised to the same mean response. 0: every region adds to every line by its flux
    alone, so that the lines are a function of a few disk totals; with a width of 0.1 to
    0.2 they depend on each region's temperature, which only its own channel ratios tell."""
    overwrite: bool = False
    """Replace existing stores instead of refusing to write over them."""

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.hmi_cadence % self.aia_cadence:
            raise ValueError("hmi_cadence must be a multiple of aia_cadence")
        return self


class TransformConfig(_Section):
    """How stored pixels become model inputs: physical units -> scaled -> z-scored."""

    size: int | None = None
    """Output image size (area-averaged from the stored size); None keeps the stored size."""
    limb: Literal["keep_corona", "mask_off_disk"] = "keep_corona"
    """``keep_corona``: EUV corona kept, HMI zero off the disk; ``mask_off_disk``: all zero off the disk."""
    scaling: dict[
        str, tuple[Literal["linear", "log", "sqrt", "asinh"], float | None, float | None]
    ] = {}
    """Per-channel (method, clip_min, clip_max) overriding the SDOML defaults (log for AIA;
    HMI clipped to +-1500 G and compressed with asinh(B / 50 G))."""
    zscore: bool = True
    """Standardise each channel with the train-split statistics (HMI: see ``magnetogram``)."""
    magnetogram: Literal["fixed", "zscore"] = "fixed"
    """HMI channels: ``fixed`` divides the scaled field by its value at the clip (1500 G), so
    every period shares one physical scale in [-1, 1]; ``zscore`` standardises them with the
    train statistics like AIA (a month of stronger fields then lies far outside them)."""
    dtype: Literal["float32", "float16"] = "float32"
    """Dtype of the images the readers hand over (float16 halves the bytes moved through
    Ray's object store): model-ready values with ``on: reader``; with ``on: device``
    physical units clipped to each channel's bounds and scaled by a power of two, made
    float32 again on the device (float16's rounding: 2**-11 of the value)."""
    on: Literal["reader", "device"] = "reader"
    """Where limb, scaling and z-score run: on the readers' CPUs, or on the training
    device (readers only decode and resize; pretraining; finetuning always uses ``reader``)."""
    stats_samples: int = Field(2000, ge=1)
    """Train samples used for the statistics (a seeded subsample when the split is larger)."""
    stats_seed: int = 0
    """Seed of the statistics subsample."""


class LoaderConfig(_Section):
    """Ray Data resources and ordering of the streaming pipeline."""

    block_size: int = Field(32, ge=1)
    """Samples per read block; a block is read chunk-aware (each chunk decoded once)."""
    blocks_per_read: int = Field(4, ge=1)
    """Consecutive blocks (in store order) one read task reads: the chunk two neighbours
    share is decoded once; epochs shuffle runs of this many blocks (and samples in blocks)."""
    readers: int = Field(2, ge=1)
    """Reader actors (each opens the stores once)."""
    cpus_per_reader: float = Field(0.5, gt=0)
    """CPUs each reader actor reserves (fractional on small machines so trainers are not starved)."""
    batch_size: int = Field(8, ge=1)
    """Samples per batch delivered to a consumer (per worker)."""
    prefetch_batches: int = Field(2, ge=0)
    """Batches prefetched by each consumer."""
    shuffle: bool = True
    """Randomise block order and sample order within blocks each epoch (train split)."""
    shuffle_buffer: int = Field(0, ge=0)
    """Local shuffle buffer of the consumer (samples); 0 (default): none. The readers already
    shuffle blocks (in runs of ``blocks_per_read``) and the samples inside each block every
    epoch; a buffer copies every sample once more and assembles each batch anew."""
    seed: int = 0
    """Seed of every shuffle: the same seed and epoch give the same order."""
    ordered: bool = True
    """Batches reach the training workers in the plan's order, and each worker the same
    blocks, whichever reader finishes first, so a seeded run repeats bit for bit; false
    lets the first finished block go first (a little more throughput when readers stall,
    an order that varies run to run)."""
    on_bad_frame: Literal["skip", "raise"] = "skip"
    """A NaN, all-zero or wrong-shape frame, or an unreadable chunk: skip the samples that use
    it and report it at the end of the run, or stop with the frame named."""
    read_retries: int = Field(3, ge=0)
    """Retries of a chunk GET that failed with a transient error (timeout, connection, HTTP 5xx)."""
    read_timeout: float = Field(120.0, gt=0)
    """Seconds one chunk GET may take before it is abandoned (and retried)."""
    read_backoff: float = Field(0.2, ge=0)
    """Seconds before the first retry; doubled for each next one (jittered, at most 10 s)."""


class PrepareConfig(_Section):
    """How ``sdofm data prepare`` writes prepared shards (``data.prepared`` reads them)."""

    shard_samples: int = Field(256, ge=1)
    """Samples per shard (one raw image file and one small metadata file each)."""
    dtype: Literal["float16", "bfloat16"] = "float16"
    """Stored dtype of the images. ``float16`` keeps 11 significant bits (z-scored and
    scaled values lie far inside its range, and a value that does not fit is an error);
    ``bfloat16`` keeps 8 bits with float32's range (for unscaled physical units)."""
    splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    """Splits to prepare."""


# --------------------------------------------------------------------------- training


class ModelConfig(_Section):
    """The backbone: a registered model and the constructor arguments that replace its own."""

    name: str = "mae_tiny"
    """Registered model, a key of ``sdofm.models.flavours.FLAVOURS``."""
    overrides: dict[str, Any] = {}
    """Constructor arguments replacing the named configuration's (``{mask_ratio: 0.5}``);
    ``img_size``, ``in_chans`` and ``num_frames`` follow the data unless set here."""
    objective: dict[str, Any] = {}
    """Settings of the family's pretraining objective (NVAE: ``kl_warmup``, ``free_bits``,
    ``spectral_weight``); each objective checks its own and names a misspelt key."""

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in FLAVOURS:
            close = difflib.get_close_matches(name, FLAVOURS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown model{hint}; known: {', '.join(FLAVOURS)}")
        return name


class TrainConfig(_Section):
    """The optimisation: AdamW, warm-up + cosine schedule, checkpoints and validation."""

    run_name: str = "pretrain"
    """Name of the run; re-running with the same name continues from its last checkpoint."""
    storage_path: str = "ray_results"
    """Where checkpoints, Tune state and a lost tracking server's metrics go: a local folder
    (made absolute) or an object-store URL (``s3://bucket/prefix``, ``gs://...``)."""
    storage_options: dict[str, Any] = {}
    """fsspec options that reach ``storage_path``, used by Ray and sdofm alike (an
    S3-compatible endpoint: ``{client_kwargs: {endpoint_url: http://...}, key: ..,
    secret: ..}``); empty: the cloud's default credentials."""
    epochs: int = Field(1, ge=1)
    """Passes over the train split (ignored once ``max_steps`` is reached)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimiser steps; None = ``epochs`` full passes."""
    lr: float = Field(1.5e-4, gt=0)
    """Peak learning rate (per effective batch of ``lr_batch`` samples, scaled linearly)."""
    lr_batch: int = Field(256, ge=1)
    """Reference batch of the learning-rate rule: lr = lr * effective_batch / lr_batch (MAE)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate of the cosine decay, as a share of the peak."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps from 0 to the peak learning rate."""
    weight_decay: float = Field(0.05, ge=0)
    """AdamW weight decay (not applied to biases, norms, tokens)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this; None disables clipping."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimiser step."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU."""
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    deterministic: bool = False
    """On GPUs, only deterministic kernels (``torch.use_deterministic_algorithms``, cuDNN's
    deterministic convolutions without autotuning, no TF32, cuBLAS's fixed workspace): the
    same seeded run gives the same losses on the same GPU model, at some cost in speed. On
    CPUs runs repeat without it (see docs/training.md)."""
    seed: int = 0
    """Seed of the weights and the masks."""
    augment_dim_min: float | None = Field(None, gt=0, le=1)
    """Pretraining only: dim each AIA channel of each training sample by a factor drawn from
    [augment_dim_min, 1], as instrument degradation (and the dimming task) does, so the
    backbone learns to represent each channel's brightness; None: off. Needs log-scaled AIA."""
    augment_dim_prob: float = Field(1.0, gt=0, le=1)
    """With ``augment_dim_min``: the share of training samples dimmed (each with probability
    this); the rest keep the Sun's own channel-to-channel brightness ratios."""
    augment_dim_target: Literal["dimmed", "observed", "both"] = "dimmed"
    """With ``augment_dim_min`` (masked reconstruction only for "observed" and "both"): what
    the masked patches are scored against. "dimmed": the input the encoder sees;
    "observed": the sample before the dimming, so the backbone learns to undo instrument
    degradation (its features become invariant to the dimming: no use to a dimming probe);
    "both": a second decoder head predicts the sample as observed beside the first's
    dimmed one, so the encoder keeps each channel's level and the level the other channels
    and instruments expect of it, whose difference is the dimming."""
    log_every: int = Field(10, ge=1)
    """Log loss, lr, grad norm and throughput to MLflow every this many steps (Ray Train gets
    a report at checkpoints and validations only: each report can wait for its 2 s poll)."""
    checkpoint_every: int = Field(200, ge=1)
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on storage (the newest)."""
    val_every: int = Field(200, ge=1)
    """Validate (loss per channel, reconstruction figure) every this many steps and at the end."""
    val_samples: int = Field(64, ge=1)
    """Validation samples (a fixed seeded subset of the val split)."""
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts from the newest complete checkpoint after a failure (a lost
    node, a killed worker; -1: unlimited). 0: fail at once."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.augment_dim_prob != 1.0 and self.augment_dim_min is None:
            raise ValueError(
                "augment_dim_prob is the share of samples the dimming augmentation dims; "
                "set augment_dim_min to turn the augmentation on"
            )
        if self.augment_dim_target != "dimmed" and self.augment_dim_min is None:
            raise ValueError(
                f"augment_dim_target={self.augment_dim_target!r} reconstructs the undimmed "
                "sample from a dimmed one; set augment_dim_min to turn the augmentation on"
            )
        return self


class WorkersConfig(_Section):
    """How many Ray Train workers and what each reserves (the ``scaling`` section)."""

    num_workers: int = Field(1, ge=1)
    """Data-parallel workers (one per GPU on a GPU cluster)."""
    use_gpu: bool | Literal["auto"] = "auto"
    """Train on GPUs; ``auto``: when the Ray cluster has any."""
    cpus_per_worker: float = Field(0.5, gt=0)
    """CPUs a worker reserves (fractional on small machines: readers need CPUs too)."""
    torch_threads: int | None = Field(None, ge=1)
    """Intra-op threads of each worker; None = Ray's default for the reserved CPUs."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes (``SPREAD``: one per node where possible)."""


class TrackingConfig(_Section):
    """MLflow: where runs are recorded and what is logged."""

    uri: str | None = None
    """Tracking URI; None = ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    experiment: str = "sdofm-pretrain"
    """MLflow experiment of the runs."""
    system_metrics: bool = True
    """Log CPU / memory / GPU utilisation of the rank-0 worker."""
    figures: int = Field(1, ge=0)
    """Validation samples drawn as reconstruction figures at each validation."""
    log_model: bool = True
    """Log the final encoder as an MLflow model."""


# --------------------------------------------------------------------------- finetuning


def _listed(value: Any) -> Any:
    """A bare number where a list of numbers is expected: a list of one."""
    return [value] if isinstance(value, (int, float)) else value


class FinetuneConfig(_Section):
    """A science head on a pretrained backbone (``sdofm.finetuning.tasks``: dimming, eve,
    missing-channel)."""

    backbone: str | None = None
    """Pretrained encoder: an MLflow run id, a ``models:/`` URI or a checkpoint folder;
    None = the newest finished run of the ``tracking.experiment`` pretraining experiment."""
    head: Literal["pool", "conv", "linear", "baseline_cnn"] = "pool"
    """``pool``: token mean + MLP; ``conv``: convolutions on the patch grid; ``linear``: token
    mean + BatchNorm + one linear layer (the MAE linear probe, for frozen encoders);
    ``baseline_cnn``: the from-scratch CNN of Dos Santos et al. (no backbone)."""
    hidden: int = Field(256, ge=1)
    """Width of the head (MLP hidden units, convolution channels)."""
    freeze: Literal["frozen", "partial", "full"] = "frozen"
    """Encoder training: ``frozen``, ``partial`` (the last ``unfreeze_blocks`` blocks), ``full``."""
    unfreeze_blocks: int = Field(0, ge=0)
    """Blocks trained with ``freeze: partial``."""
    alpha_min: float = Field(0.01, gt=0, lt=1)
    """Dimming factors are drawn uniformly from [alpha_min, 1], per sample, channel and epoch."""
    dim_seed: int = 0
    """Seed of the dimming factors (val and test factors are fixed, train ones change per epoch)."""
    success_tolerance: Annotated[list[Annotated[float, Field(gt=0)]], BeforeValidator(_listed)] = (
        Field([0.05, 0.1], min_length=1)
    )
    """dimming: a prediction succeeds when |alpha_hat - alpha| is below a tolerance; ``success``
    (overall and per channel) takes the first, ``success_<t>`` each one (Dos Santos et al.
    report 0.05 and 0.1). A single number is a list of one."""
    held_out: list[str] = ["94A"]
    """missing-channel: the channels withheld from the input (set to 0, their train mean)
    and reconstructed from the others."""
    epochs: int = Field(10, ge=1)
    """Passes over the train split."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (warm-up of one epoch's 10 %, then cosine)."""
    encoder_lr_scale: float = Field(1.0, gt=0, le=1)
    """The trained encoder blocks' learning rate as a share of ``lr`` (the head's), with
    ``freeze: partial`` or ``full``; below 1 a finetuned encoder keeps more of what
    pretraining gave it."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay."""
    batch_size: int = Field(16, ge=1)
    """Samples per batch and worker."""
    max_train_samples: int | None = Field(None, ge=1)
    """Use a seeded subset of the train split of at most this many samples."""
    max_val_samples: int | None = Field(None, ge=1)
    """Validate each epoch on a seeded subset of the val split of at most this many samples
    (validation only follows training; the test split is always scored whole)."""
    head_seeds: int = Field(3, ge=1)
    """``sdofm evaluate``: heads trained per arm, with seeds ``train.seed``, ``train.seed + 1``,
    ... (the head's weights and data order; the random-init arm's encoder too); the board's
    intervals resample the seeds with the test days."""
    materialize_max_gb: float = Field(2.0, ge=0)
    """Keep the prepared splits in Ray's object store (read once, shared by every trial)
    when together they take at most this many GB; else each run streams them from the
    store with bounded memory."""
    run_name: str = "dimming"
    """Name of the run (checkpoints, MLflow)."""
    experiment: str = "sdofm-dimming"
    """MLflow experiment of finetuning runs and sweeps."""

    @field_validator("success_tolerance")
    @classmethod
    def _distinct(cls, tolerances: list[float]) -> list[float]:
        if len(set(tolerances)) != len(tolerances):
            raise ValueError("a tolerance is listed twice")
        return tolerances

    @field_validator("held_out")
    @classmethod
    def _known_channels(cls, held_out: list[str]) -> list[str]:
        known = (*AIA_CHANNELS, *HMI_CHANNELS)
        for c in held_out:
            if c not in known:
                raise ValueError(f"unknown channel {c!r}; known: {', '.join(known)}")
        if len(set(held_out)) != len(held_out):
            raise ValueError("a channel is listed twice")
        return held_out


def _number(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _finetune_value(key: str, value: Any) -> Any:
    """``value`` as ``finetune.<key>`` takes it (YAML reads ``1e-3`` as a string)."""
    try:
        return getattr(FinetuneConfig.model_validate({key: value}), key)
    except ValidationError as e:
        msg = e.errors()[0]["msg"]
        raise ValueError(f"space.{key}: {value!r} is not a valid finetune.{key} ({msg})") from None


class GenerationConfig(_Section):
    """How ``sdofm evaluate`` scores a generative backbone (StyleSwin): its EMA generator's
    frames against the held-out (test) frames, every metric calibrated against two halves of
    the real frames and deliberate corruptions of them (``sdofm.generation``)."""

    feature_backbone: str | None = None
    """The pretrained MAE whose encoder is the learned feature space (a run id, ``models:/``
    URI or checkpoint folder); None: the newest finished MAE pretraining run of
    ``tracking.experiment`` that fits the data, and without one that space is skipped."""
    splits: int = Field(5, ge=2)
    """Random halvings of the real frames; a metric separates a corruption (or one generator
    beats another) when it is worse (better) on every split."""
    train_frames: int = Field(256, ge=8)
    """Training frames the memorisation check compares generated frames with."""
    seed: int = 0
    """Seed of the splits, the corruptions' noise and the generators' latents (the random
    feature network is one fixed network for every run)."""


class SweepConfig(_Section):
    """The Ray Tune sweep over the head's hyperparameters (the ``tune`` section)."""

    num_samples: int = Field(4, ge=1)
    """Trials."""
    max_concurrent: int = Field(2, ge=1)
    """Trials running at once."""
    search: Literal["random", "optuna"] = "random"
    """Random search, or Optuna's TPE (the ``optuna`` extra)."""
    metric: str = "val/mae"
    """What the sweep minimises: dimming ``val/mae`` (of alpha), eve ``val/rel_error``,
    missing-channel ``val/mse``."""
    grace_period: int = Field(2, ge=1)
    """ASHA: epochs every trial runs before it may be stopped."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA: share of trials kept at each rung (1 / reduction_factor)."""
    trial_cpus: float = Field(0.25, gt=0)
    """CPUs the trial driver reserves (its Ray Train workers reserve their own)."""
    space: dict[str, dict[str, list[Any]]] = {
        "lr": {"loguniform": [1e-4, 3e-3]},
        "weight_decay": {"loguniform": [1e-6, 1e-2]},
        "head": {"choice": ["pool", "conv"]},
        "unfreeze_blocks": {"choice": [0, 1, 2]},
        "batch_size": {"choice": [8, 16]},
    }
    """finetune.<key> -> {uniform | loguniform: [low, high]} or {choice: [values]}."""
    name: str = "dimming_sweep"
    """Name of the sweep (``--resume`` continues the sweep of this name)."""

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        known = set(FinetuneConfig.model_fields)
        for key, spec in self.space.items():
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"space: {key!r} is not a finetune setting{hint}")
            if len(spec) != 1:
                raise ValueError(f"space.{key}: give exactly one of uniform, loguniform, choice")
            ((kind, values),) = spec.items()
            if kind == "choice":
                if not values:
                    raise ValueError(f"space.{key}: choice needs at least one value")
                # each value must be valid for the finetune setting, and is typed as it
                values[:] = [_finetune_value(key, v) for v in values]
            elif kind in ("uniform", "loguniform"):
                values[:] = [_number(v) for v in values]  # YAML reads 1e-3 as a string
                if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
                    raise ValueError(f"space.{key}: {kind} needs [low, high], got {values}")
                lo, hi = values
                if not lo < hi:
                    raise ValueError(f"space.{key}: {kind} range [{lo}, {hi}] is empty")
                if kind == "loguniform" and lo <= 0:
                    raise ValueError(f"space.{key}: loguniform needs low > 0, got {lo}")
                _finetune_value(key, lo)
                _finetune_value(key, hi)
            else:
                raise ValueError(
                    f"space.{key}: unknown kind {kind!r} (uniform, loguniform, choice)"
                )
        return self


class Config(_Section):
    """A whole sdofm experiment."""

    data: DataConfig = DataConfig()
    """Stores, channels, alignment and splits."""
    transform: TransformConfig = TransformConfig()
    """Scaling, z-score, limb and size of the model inputs."""
    loader: LoaderConfig = LoaderConfig()
    """Ray Data resources, batch size, shuffling, bad-frame policy."""
    synth: SynthConfig = SynthConfig()
    """The synthetic Sun written when ``data.root`` holds no stores."""
    prepare: PrepareConfig = PrepareConfig()
    """Prepared shards: samples per shard, stored dtype, splits."""
    model: ModelConfig = ModelConfig()
    """The backbone to pretrain."""
    train: TrainConfig = TrainConfig()
    """Optimiser, schedule, checkpoints, validation and resume."""
    scaling: WorkersConfig = WorkersConfig()
    """Ray Train workers and their resources."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow."""
    finetune: FinetuneConfig = FinetuneConfig()
    """The science head and how it is trained."""
    tune: SweepConfig = SweepConfig()
    """The hyperparameter sweep of the head."""
    generation: GenerationConfig = GenerationConfig()
    """How ``sdofm evaluate`` scores a generative backbone's samples."""


# --------------------------------------------------------------------------- loading


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _boolean_keys(tree: dict, prefix: str = "") -> list[str]:
    """The sections (dotted; ``top level`` for the root) holding a key YAML read as a bool."""
    out = [prefix.rstrip(".") or "the top level"] if any(isinstance(k, bool) for k in tree) else []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _boolean_keys(v, f"{prefix}{k}.")
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    where = _boolean_keys(raw)
    if where:
        raise ConfigError(
            f"{path}: YAML reads a bare on, off, yes or no as true / false, and a key under "
            f'{", ".join(where)} came out so: quote it, as in transform: {{"on": device}}'
        )
    bases = raw.pop("extends", None)
    if bases is None:
        return raw
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, _read_yaml(path.parent / base, (*seen, path)))
    return _deep_merge(merged, raw)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = child
    node[leaf] = value


def _describe(err: dict, tree: dict, source: str) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<top>"
    if err["type"] == "extra_forbidden":
        parent: type[BaseModel] | None = Config
        for p in loc[:-1]:
            field = parent.model_fields.get(p) if parent else None
            ann = field.annotation if field else None
            parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(loc[-1], list(parent.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            hint += f"; valid keys: {', '.join(parent.model_fields)}"
        return f"unknown key {key!r} = {err['input']!r} in {source}{hint}"
    return f"{key} = {err['input']!r} in {source}: {err['msg']}"


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.

    ``overrides`` are ``"section.key=value"`` strings; the value is parsed as YAML
    (``data.num_frames=3`` is an int, ``data.aia_channels=[171A,193A]`` a list).
    """
    source = str(path) if path is not None else "<defaults>"
    tree = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        # YAML reads '12:00' and dates itself; keep datetimes/durations as typed text.
        if isinstance(value, (dt.date, int)) and not text.strip().lstrip("-").isdigit():
            value = text
        _set_dotted(tree, key.strip(), value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        where = source + (f" (with overrides {list(overrides)})" if overrides else "")
        lines = [_describe(err, tree, where) for err in e.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def dump_config(cfg: BaseModel) -> dict:
    """The config as plain YAML-able data (durations as '12min', dates as ISO strings)."""
    return cfg.model_dump(mode="json")
