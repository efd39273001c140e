"""``sdofm mlflow``: a tracking server, and the sync of a run that lost its server."""

from __future__ import annotations

from typing import Annotated

import typer

from sdofm.cli.common import Args, console, friendly_errors, load_args

mlflow_app = typer.Typer(
    help="MLflow: a tracking server (no sub-command), or sync a run that lost its server.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@mlflow_app.callback()
def mlflow_cmd(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 only behind a firewall.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the UI and REST API.")] = 5000,
    backend_store_uri: Annotated[
        str, typer.Option(help="Where runs are kept (sqlite file or a database URL).")
    ] = "sqlite:///mlflow.db",
    artifacts_destination: Annotated[
        str | None,
        typer.Option(help="Artifact root (a folder, s3://, gs://); default: ./mlartifacts."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Server processes; default: MLflow's (4). 1 on a small machine."),
    ] = None,
) -> None:
    """Start an MLflow tracking server that Ray workers on other nodes can log to.

    Point jobs at it with MLFLOW_TRACKING_URI=http://HOST:PORT.
    """
    if ctx.invoked_subcommand is not None:
        return
    import os
    import sys

    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
    ]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    if workers:
        cmd += ["--workers", str(workers)]
    console.print(
        f"MLflow server on http://{host}:{port} (export MLFLOW_TRACKING_URI=http://{host}:{port})"
    )
    os.execv(sys.executable, cmd)


@mlflow_app.command("sync")
def mlflow_sync(
    folder: Annotated[
        str,
        typer.Argument(
            help="The run's tracking folder, <train.storage_path>/<run name>/tracking, as "
            "printed when the server was lost (a folder or URL).",
            show_default=False,
        ),
    ],
    args: Args = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="Send to this server instead of the one the run used."),
    ] = None,
) -> None:
    """Merge what a run kept locally while its MLflow server was down (metrics, figures,
    tags) into its run, and close the run with the status it ended with.

    Steps the run already holds are not sent again. ARGS (train.storage_options=...) reach
    an object store; run it once the server is back.
    """
    from sdofm.tracking import sync

    with friendly_errors():
        cfg = load_args(args)
        try:
            done = sync(folder, cfg.train.storage_options, tracking_uri)
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None
    console.print(
        f"run {done['run_id']} at {done['tracking_uri']}: {done['metric_steps']} steps of "
        f"metrics, {done['figures']} figures, {done['tags']} tags sent; "
        f"status {done['status'] or 'left as it was'}",
        highlight=False,
    )
