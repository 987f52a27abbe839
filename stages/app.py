"""The `imager` command: one subcommand per DVC stage (dvc.yaml passes every path as an option)."""

from __future__ import annotations

import typer

from stages.control import evaluate_control, train_control
from stages.download import download
from stages.embed import embed
from stages.evaluate import evaluate, evaluate_edits, train_evaluator
from stages.finetune import evaluate_finetune, finetune, train_lora
from stages.generate import generate
from stages.params import check_params
from stages.shard import shard
from stages.train import train_base, train_sr
from stages.ui import ui

app = typer.Typer(
    name="imager",
    help=(
        "Imager: text-to-image diffusion as a DVC pipeline.\n\n"
        "Each command but `generate` is one stage of dvc.yaml: check-params, then download -> shard -> "
        "embed -> train-base, train-sr, train-evaluator -> evaluate, evaluate-edits; finetune/dvc.yaml adds finetune, train-lora and "
        "evaluate-finetune, control/dvc.yaml train-control and evaluate-control. Run them all with `dvc repro` (and `dvc repro finetune/dvc.yaml`, "
        "`dvc repro control/dvc.yaml`); params "
        "live in params.yaml. `imager generate \"red apple\" --out apple.png` draws with the result; `imager ui` serves the web app and HTTP API."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command("check-params")(check_params)
app.command()(download)
app.command()(shard)
app.command()(embed)
app.command("train-base")(train_base)
app.command("train-sr")(train_sr)
app.command("train-evaluator")(train_evaluator)
app.command()(evaluate)
app.command("evaluate-edits")(evaluate_edits)
app.command()(finetune)
app.command("train-lora")(train_lora)
app.command("evaluate-finetune")(evaluate_finetune)
app.command("train-control")(train_control)
app.command("evaluate-control")(evaluate_control)
app.command()(generate)
app.command()(ui)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
