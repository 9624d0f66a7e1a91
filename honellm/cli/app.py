"""The `hone` command: one small module per verb; each parses its arguments and calls one library function."""

from __future__ import annotations

import logging
import os
import sys

import typer

from honellm import __version__
from honellm.cli import (
    advise_cmd,
    align_cmd,
    compare_cmd,
    data_cmd,
    demo_cmd,
    eval_cmd,
    export_cmd,
    models_cmd,
    prompt_cmd,
    report_cmd,
    serve_cmd,
    show_cmd,
    tune_cmd,
    ui_cmd,
)
from honellm.cli.common import err_console, fail
from honellm.errors import HoneError

app = typer.Typer(
    name="hone",
    help="Hone an open LLM for one task: prompting, tuning and reward-based training, compared side by side.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# The order here is the order of `hone --help`: the flow from data to serving.
for module in (data_cmd, models_cmd, prompt_cmd, tune_cmd, align_cmd, eval_cmd, compare_cmd, advise_cmd, report_cmd,
               show_cmd, serve_cmd, ui_cmd, export_cmd, demo_cmd):
    module.register(app)


def _version(value: bool):
    if value:
        print(f"hone {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")):
    """Hone: take an open LLM and hone it for one task."""


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # Library notices that are not the user's to act on: transformers' weight-loading bars (Hone shows its own
    # progress) and deprecation warnings raised inside transformers and peft.
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        app()
    except HoneError as err:
        fail(err)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
