"""`imager check-params`: validate params.yaml as a whole (the `params` stage of dvc.yaml).

Every stage validates the whole file when it runs, but DVC reruns a stage only when its own params
sections change, so a new unknown key (`foo: 1`) or a typo in a section no stage has rerun for
would go unnoticed. The `params` stage depends on all of params.yaml and runs first: any change to
the file is checked by the next `dvc repro`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import ParamsOption, load_params, user_errors


@user_errors
def check_params(params: ParamsOption = Path("params.yaml")) -> None:
    """Validate every section of the params file; a bad value or an unknown key is a one-line error."""
    p = load_params(params)
    typer.echo(f"{params}: valid ({len(type(p).model_fields)} sections and top-level keys)")
