"""Does pretraining help? One backbone scored on the benchmark archive in the four settings
of the comparison: dimming and virtual EVE, the encoder frozen and fully finetuned, each
against the same encoder with random weights and the from-scratch CNN (``sdofm evaluate``'s
powered board: head seeds x resampled test days).

    .venv/bin/python bench/pretraining_helps.py nvae <pretraining run id>
    .venv/bin/python bench/pretraining_helps.py mae <run id> --label mae_restore   # another recipe
    .venv/bin/python bench/pretraining_helps.py --table          # every board written so far

Each setting's board goes to ``results/pretraining_helps/<data>/<label>-<task>-<freeze>.json`` as
it finishes (a setting already there is not run again, so the comparison can be carried
over several sessions); the script then prints the table of every board there, in
Markdown, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "pretraining_helps"
TASKS = {"dimming": ("mae", "down"), "eve": ("rel_error", "down")}
"""task -> the board metric the table shows, and its better direction."""
SETTINGS = ("frozen", "full")
CONFIGS = {  # family -> task -> head config (the same head settings for every family)
    "mae": {"dimming": "dimming.yaml", "eve": "eve.yaml"},
    "nvae": {"dimming": "dimming_nvae.yaml", "eve": "eve_nvae.yaml"},
    "styleswin": {"dimming": "dimming.yaml", "eve": "eve.yaml"},
    "forecast": {"dimming": "dimming_forecast.yaml", "eve": "eve.yaml"},
}
HEAD_BUDGET = (
    "finetune.max_train_samples=1024",
    "finetune.max_val_samples=256",
    "finetune.epochs=5",
    "finetune.encoder_lr_scale=0.1",
)
"""Each head's budget: 1,024 training samples for 5 epochs, validated on 256; every test day.
A finetuned encoder learns at a tenth of the head's rate (at the head's rate full
finetuning undid what pretraining had learned)."""


def config(family: str, task: str, freeze: str, backbone: str, seed: int, data: Path):
    """The head config of ``family`` for ``task`` on the archive of the ``data`` config."""
    from sdofm.config import load_config

    head = ROOT / "configs" / "finetune" / CONFIGS[family][task]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "benchmark.yaml"
        path.write_text(json.dumps({"extends": [str(head), str(data)]}))
        return load_config(
            path,
            [
                *HEAD_BUDGET,
                f"finetune.freeze={freeze}",
                f"finetune.backbone={backbone}",
                f"train.seed={seed}",
                f"train.storage_path={ROOT / 'ray_results'}",
                f"tracking.uri=sqlite:///{ROOT / 'mlflow.db'}",
            ],
        )


def run(family: str, backbone: str, seed: int, data: Path, label: str, only=None) -> None:
    from sdofm.finetuning.evaluate import evaluate, format_board
    from sdofm.runtime import init_ray

    init_ray(verbose=False, dashboard=True)  # as the CLI: Ray's lines to logs/
    (OUT / data.stem).mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        for freeze in SETTINGS:
            if only and f"{task}-{freeze}" not in only:
                continue
            out = OUT / data.stem / f"{label}-{task}-{freeze}.json"
            if out.exists():
                print(f"{out.name}: done before, kept")
                continue
            start = time.perf_counter()
            board = evaluate(
                config(family, task, freeze, backbone, seed, data), [task], heads_only=True
            )
            seconds = time.perf_counter() - start
            print(format_board(board), flush=True)
            record = {
                "family": family,
                "label": label,
                "data": data.stem,
                "task": task,
                "freeze": freeze,
                "backbone": backbone,
                "seed": seed,
                "head_budget": list(HEAD_BUDGET),
                "seconds": round(seconds),
                "evaluate_run": board.run_id,
                "resampled": board.resampled.get(task),
                "rows": [r for r in board.rows if r["task"] == task],
            }
            out.write_text(json.dumps(record, indent=1))


def table() -> None:
    """The Markdown table of every board in :data:`OUT`, and one JSON line."""

    def cell(row, arm):
        lo, hi = row[f"{arm}_ci"]
        return f"{row[arm]:.4f} [{lo:.4f}, {hi:.4f}]"

    lines = [
        "| archive | backbone | task, metric | encoder | pretrained | random weights | from scratch "
        "| beats random | beats scratch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for path in sorted(OUT.glob("*/*.json")):
        rec = json.loads(path.read_text())
        metric, _ = TASKS[rec["task"]]
        row = next(r for r in rec["rows"] if r["metric"] == metric)
        verdicts = ["yes" if row[f"beats_{c}"] else "NO" for c in ("random_init", "from_scratch")]
        lines.append(
            f"| {rec['data']} | {rec.get('label', rec['family'])} | {rec['task']} {metric} | "
            f"{rec['freeze']} | "
            f"{cell(row, 'pretrained')} | {cell(row, 'random_init')} | "
            f"{cell(row, 'from_scratch')} | {verdicts[0]} | {verdicts[1]} |"
        )
        summary.append(
            {
                "data": rec["data"],
                "family": rec["family"],
                "label": rec.get("label", rec["family"]),
                "task": rec["task"],
                "freeze": rec["freeze"],
                metric: round(row["pretrained"], 5),
                "random": round(row["random_init"], 5),
                "scratch": round(row["from_scratch"], 5),
                "beats_random": row["beats_random_init"],
                "seconds": rec["seconds"],
            }
        )
    print("\n".join(lines))
    print(json.dumps({"bench": "pretraining_helps", "boards": summary}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", nargs="?", choices=sorted(CONFIGS))
    p.add_argument("backbone", nargs="?", help="pretraining run id or checkpoint folder")
    p.add_argument("--seed", type=int, default=0, help="first head seed (train.seed)")
    p.add_argument("--data", default="configs/data/benchmark.yaml", help="the archive's config")
    p.add_argument("--label", help="the recipe's name in the table and file names (the family's)")
    p.add_argument(
        "--only",
        action="append",
        choices=[f"{t}-{f}" for t in TASKS for f in SETTINGS],
        help="run this setting's board only (repeatable; default: all four)",
    )
    p.add_argument("--table", action="store_true", help="only print the table")
    a = p.parse_args()
    if not a.table:
        if not (a.family and a.backbone):
            p.error("give a family and a backbone, or --table")
        os.chdir(ROOT)  # data roots in the configs are relative to the checkout
        run(a.family, a.backbone, a.seed, (ROOT / a.data).resolve(), a.label or a.family, a.only)
    table()


if __name__ == "__main__":
    main()
