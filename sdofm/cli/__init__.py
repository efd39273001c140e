"""The ``sdofm`` command line, one module per command group. Commands only parse arguments
and call the package.

Heavy libraries (numpy, zarr, ray, torch, mlflow) are imported inside commands so
that ``sdofm --help`` answers at once.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sdofm.cli.common import set_verbose
from sdofm.cli.data import data_app
from sdofm.cli.demo import demo_cmd
from sdofm.cli.finetune import embed_cmd, evaluate_cmd, finetune_cmd, tune_cmd
from sdofm.cli.pretrain import pretrain_cmd
from sdofm.cli.tracking import mlflow_app

app = typer.Typer(
    help="sdofm: foundation models of the Sun on SDO data (SDOML v2), with Ray and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Show Ray's, Tune's and the workers' own log lines live."
        ),
    ] = False,
) -> None:
    """sdofm: foundation models of the Sun on SDO data (SDOML v2), with Ray and MLflow."""
    set_verbose(verbose)


app.add_typer(data_app, name="data")
app.command("pretrain")(pretrain_cmd)
app.command("finetune")(finetune_cmd)
app.command("tune")(tune_cmd)
app.command("evaluate")(evaluate_cmd)
app.command("embed")(embed_cmd)
app.add_typer(mlflow_app, name="mlflow")
app.command("demo")(demo_cmd)
