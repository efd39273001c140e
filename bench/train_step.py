"""Training step time: a plain PyTorch loop vs the same step inside Ray Train (one worker).

Same model, same in-memory batch, same step (forward, backward, clip, AdamW), so the ratio
isolates what Ray Train adds (the worker process, report calls, DDP wrapper). Prints ms per
step, samples/s, tokens/s, achieved FLOP/s and, on a GPU with a known peak, model FLOPs
utilisation (MFU).

    .venv/bin/python bench/train_step.py      # mae_tiny at 64 px, patch 8, as the demo (CPU)
    python bench/train_step.py --model mae_104m --img-size 0 --patch-size 0 --batch 32   # GPU, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from sdofm.models import get_model

# Dense bf16 peak FLOP/s by device name (no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def mae_flops_per_sample(model) -> float:
    """Forward FLOPs of one sample through the MAE (2 per multiply-add), analytic.

    The encoder sees 1 + kept tokens, the decoder 1 + L; per block 24 D^2 per token for the
    projections and MLP (mlp_ratio 4) and 4 n D per token for attention scores and values.
    """
    L = model.num_patches
    n_enc = 1 + model.num_keep(model.mask_ratio)
    n_dec = 1 + L
    D = model.embed_dim
    Dd = model.decoder_embed.out_features
    depth, ddepth = len(model.blocks), len(model.decoder_blocks)
    patch_in = model.patch_dim

    def blocks(n: int, dim: int, k: int) -> float:
        return k * n * (24 * dim * dim + 4 * n * dim)

    return (
        2 * L * patch_in * D  # patch embedding of every token, before masking
        + blocks(n_enc, D, depth)
        + 2 * n_enc * D * Dd  # decoder embedding
        + blocks(n_dec, Dd, ddepth)
        + 2 * L * Dd * patch_in  # pixel prediction
    )


def make_step(model, precision: str, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    use_bf16 = device.type == "cuda" and precision == "bf16"

    def step(x):
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with ctx:
            loss = model(x)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def timed_steps(step, x, steps: int, warmup: int, device, report=None) -> list[float]:
    """Seconds per step after ``warmup`` steps; ``report(i)`` is called after each step."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        value = loss.item()  # waits for the step on CPU too
        if report is not None:
            report(i, value)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def build(args, device):
    torch.manual_seed(0)
    overrides = {"img_size": args.img_size} if args.img_size else {}
    if args.patch_size:
        overrides["patch_size"] = args.patch_size
    model = get_model(args.model, **overrides).to(device)
    if args.compile:
        model = torch.compile(model)
    core = getattr(model, "_orig_mod", model)
    x = torch.randn(args.batch, core.in_chans, core.num_frames, *core.img_size, device=device)
    return model, core, x


def plain(args) -> list[float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _, x = build(args, device)
    return timed_steps(make_step(model, args.precision, device), x, args.steps, args.warmup, device)


def run_trainer(loop, name: str, workers: int = 1, **trainer_kwargs):
    """``loop(config)`` in a ``TorchTrainer`` of ``workers`` (1 CPU each, and a GPU when
    there is one); what rank 0 passes to ``write_result`` is returned."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out = os.path.abspath(f".bench_{name}_{os.getpid()}.json")
    use_gpu = torch.cuda.is_available()
    TorchTrainer(
        loop,
        train_loop_config={"out": out},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"bench_{name}_{os.getpid()}", storage_path=os.path.abspath("ray_results")
        ),
        **trainer_kwargs,
    ).fit()
    with open(out) as f:
        got = json.load(f)
    os.remove(out)
    return got


def write_result(config: dict, result) -> None:
    """Rank 0's result of a ``run_trainer`` loop."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump(result, f)


def in_ray_train(args, round_: int = 0) -> list[float]:
    import ray.train
    import ray.train.torch

    from sdofm.runtime import init_ray

    init_ray()
    threads = torch.get_num_threads()

    def loop(config):
        torch.set_num_threads(threads)  # the same intra-op threads as the plain loop
        device = ray.train.torch.get_device()
        model, _, x = build(args, device)
        model = ray.train.torch.prepare_model(model)
        every = args.report_every

        def report(i, loss):  # as the sdofm loop: a Ray Train report at checkpoints
            if (i + 1) % every == 0:
                ray.train.report({"loss": loss, "step": i + 1})

        times = timed_steps(
            make_step(model, args.precision, device), x, args.steps, args.warmup, device, report
        )
        write_result(config, times)

    return run_trainer(loop, f"train_step_{round_}")


def data_config(args):
    """The streaming pipeline's config for ``--data``: every aligned step of the store a
    train sample, the transform on the device, images in ``--data-dtype``."""
    from sdofm.config import load_config

    root = os.path.abspath(args.data)
    return load_config(
        None,
        [
            f"data.root={root}",
            f"data.cache_dir={root}/cache",
            "data.split.val_months=[]",
            "data.split.test_months=[]",
            "transform.on=device",
            f"transform.dtype={args.data_dtype}",
            "transform.stats_samples=256",
            f"loader.readers={args.readers}",
            "loader.cpus_per_reader=1",
            f"loader.batch_size={args.batch}",
        ],
    )


def data_model(args, shape):
    """``--model`` for samples of ``shape`` (C, T, H, W), seeded."""
    torch.manual_seed(0)
    patch = {"patch_size": args.patch_size} if args.patch_size else {}
    return get_model(args.model, in_chans=shape[0], num_frames=shape[1], img_size=shape[2], **patch)


def fed(args) -> dict:
    """The training step fed by the streaming pipeline in a Ray Train worker, as the engine
    feeds it (``batch_options``, ``DeviceShard``: pinned copies, the device transform):
    seconds per step and the share of each step spent waiting for its batch."""
    import ray.train
    import ray.train.torch

    from sdofm.datasets.device import device_transform
    from sdofm.datasets.inputs import build_inputs
    from sdofm.engine import loop_config
    from sdofm.engine.loop import DeviceShard, batch_options
    from sdofm.engine.trainer import ingest_config
    from sdofm.runtime import init_ray

    init_ray()
    cfg = data_config(args)
    inputs = build_inputs(cfg)
    shape = inputs.pipeline.sample_shape()  # (C, T, H, W)
    transform = device_transform(cfg.data, cfg.transform, shape[-1], inputs.stats)
    loop = loop_config(cfg, epochs=1, schedule_steps=1, lr=0.0, batch_size=args.batch)
    threads = torch.get_num_threads()

    def train(config):
        torch.set_num_threads(threads)
        device = ray.train.torch.get_device()
        model = ray.train.torch.prepare_model(data_model(args, shape).to(device))
        step = make_step(model, args.precision, device)
        shard = DeviceShard(ray.train.get_dataset_shard("train"), transform, device)

        def batches():
            epoch = 0
            while True:
                yield from shard.iter_torch_batches(**batch_options(loop, epoch))
                epoch += 1

        it, waits, times = batches(), [], []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            x = next(it)["image"]
            t1 = time.perf_counter()
            loss = step(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            loss.item()
            if i >= args.warmup:
                waits.append(t1 - t0)
                times.append(time.perf_counter() - t0)
        write_result(config, {"times": times, "waits": waits})

    got = run_trainer(
        train,
        "fed",
        args.workers,
        datasets={"train": inputs.pipeline.dataset("train")},
        dataset_config=ingest_config(loop.ordered),
    )
    return {"shape": list(shape), **got}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mae_tiny")
    p.add_argument("--img-size", type=int, default=64, help="0 keeps the model's own size")
    p.add_argument("--patch-size", type=int, default=8, help="0 keeps the model's own")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--report-every", type=int, default=50, help="steps between ray.train.report calls"
    )
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-ray", action="store_true", help="only the plain loop (MFU runs)")
    p.add_argument(
        "--data",
        default=None,
        help="a store's data.root: time the step fed by the streaming pipeline instead "
        "(a Ray Train worker; the model takes the store's channels and size)",
    )
    p.add_argument("--data-dtype", choices=["float32", "float16"], default="float16")
    p.add_argument("--readers", type=int, default=2, help="--data: pipeline readers (1 CPU each)")
    p.add_argument("--workers", type=int, default=1, help="--data: Ray Train workers (DDP)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating plain / Ray Train rounds; the overhead is the median of their ratios",
    )
    args = p.parse_args()
    if args.data:
        return main_fed(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, core, _ = build(args, torch.device("cpu"))
    flops = 3 * mae_flops_per_sample(core) * args.batch  # forward + backward = 3 forwards
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU x{torch.get_num_threads()} threads"
    )
    precision = args.precision if device.type == "cuda" else "fp32"
    print(
        f"{args.model} at {core.img_size[0]} px, batch {args.batch}, {core.num_patches} tokens/sample, "
        f"{sum(p.numel() for p in core.parameters()) / 1e6:.1f} M params, {precision}, {name}"
    )
    print(f"model FLOPs per step: {flops / 1e9:.2f} GFLOP (analytic, 3 x forward)")

    rounds = 1 if args.no_ray else max(1, args.rounds)
    runs: dict[str, list[list[float]]] = {"plain PyTorch": [], "Ray Train, 1 worker": []}
    for i in range(rounds):  # alternated, so that drifts in machine load hit both alike
        runs["plain PyTorch"].append(plain(args))
        if not args.no_ray:
            runs["Ray Train, 1 worker"].append(in_ray_train(args, i))
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    for label, per_round in runs.items():
        if not per_round:
            continue
        times = [t for r in per_round for t in r]
        med = statistics.median(times)
        line = (
            f"{label:<22} {med * 1e3:8.1f} ms/step (median of {len(times)}; "
            f"mean {statistics.mean(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})  "
            f"{args.batch / med:8.1f} samples/s  {args.batch * core.num_patches / med:10.0f} tokens/s  "
            f"{flops / med / 1e12:6.2f} TFLOP/s"
        )
        if peak and precision == "bf16":
            line += f"  MFU {flops / med / peak:.1%}"
        print(line)
    if not args.no_ray:
        ratios = sorted(
            statistics.median(b) / statistics.median(a) - 1
            for a, b in zip(runs["plain PyTorch"], runs["Ray Train, 1 worker"], strict=True)
        )
        means = [
            statistics.mean(b) / statistics.mean(a) - 1
            for a, b in zip(runs["plain PyTorch"], runs["Ray Train, 1 worker"], strict=True)
        ]
        print(
            f"Ray Train overhead: {statistics.median(ratios):+.1%} of the median step time "
            f"(median of {rounds} rounds; range {ratios[0]:+.1%} .. {ratios[-1]:+.1%}), "
            f"{statistics.median(means):+.1%} of the mean (report stalls included; goal <= 5%)"
        )


def main_fed(args) -> None:
    """``--data``: the step fed by the pipeline, against the same step on a batch already
    on the device (plain PyTorch, same model and batch size)."""
    got = fed(args)
    c, t, h, _ = got["shape"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = data_model(args, got["shape"]).to(device)
    x = torch.randn(args.batch, c, t, h, h, device=device)
    plain_times = timed_steps(
        make_step(model, args.precision, device), x, args.steps, args.warmup, device
    )
    fed_s, wait_s = statistics.median(got["times"]), sum(got["waits"]) / sum(got["times"])
    plain_s = statistics.median(plain_times)
    flops = 3 * mae_flops_per_sample(model) * args.batch
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    line = {
        "bench": "train_step_fed",
        "model": args.model,
        "device": name,
        "workers": args.workers,
        "readers": args.readers,
        "data_dtype": args.data_dtype,
        "sample_shape": got["shape"],
        "batch": args.batch,
        "fed_ms_per_step": round(fed_s * 1e3, 2),
        "plain_ms_per_step": round(plain_s * 1e3, 2),
        "fed_samples_per_s": round(args.batch * args.workers / fed_s, 1),
        "plain_samples_per_s": round(args.batch / plain_s, 1),
        "data_wait_share": round(wait_s, 3),
        "fed_mfu": round(flops / fed_s / peak, 3) if peak and args.precision == "bf16" else None,
    }
    print(
        f"{args.model}, {c} channels at {h} px, batch {args.batch}, {name}: fed by the pipeline "
        f"{line['fed_ms_per_step']} ms/step ({line['fed_samples_per_s']} samples/s), "
        f"{wait_s:.0%} of it waiting for data; on a ready batch {line['plain_ms_per_step']} ms/step"
    )
    print(json.dumps(line))


if __name__ == "__main__":
    main()
