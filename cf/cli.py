"""The `cf` command.

- `cf fit|validate|test|predict --config configs/....yaml` — LightningCLI: any LightningModule / LightningDataModule
  selected by `class_path` in the YAML; the resolved config is saved next to the logs, so
  `cf fit --config <run>/config.yaml --ckpt_path <ckpt>` resumes a run.
- `cf demo|toy-base|generate|serve|evaluate|convert|data ...` — the project's tools (`cf <command> --help`).

Run from the command line, a mistake the user can fix (a missing file, a bad value: FileNotFoundError, ValueError,
KeyError, ...) prints one line, ``cf: error: <message>``, and exits with status 2; ``cf --debug <command> ...`` (or
``CF_DEBUG=1``) shows the full traceback instead. Called from Python with an argument list, `main` raises.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# Exceptions our validation raises for mistakes a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, NotADirectoryError,
                                                IsADirectoryError, ValueError, KeyError)
USAGE_ERROR_STATUS = 2

# command name -> module with `register(subparsers)`
TOOL_MODULES = {
    "demo": "cf.demo",
    "toy-base": "cf.toy_base",
    "generate": "cf.generate",
    "serve": "cf.serve",
    "evaluate": "cf.evaluation.cli",
    "convert": "cf.convert",
    "data": "data.cli",
}


def run_lightning_cli(args: list[str]) -> None:
    """`cf fit|validate|test|predict` (`cf.lightning_cli`)."""
    from cf.lightning_cli import run_lightning_cli as launch

    launch(args)


def build_tool_parser(commands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cf",
        description="Context Forcing: long-context autoregressive video generation. Training runs through "
        "`cf fit --config <yaml>` (LightningCLI); the tools below cover the rest.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, module in (commands or TOOL_MODULES).items():
        importlib.import_module(module).register(sub)
    return parser


def _raised_by(error: BaseException, package: str) -> bool:
    """Whether the innermost frame of ``error``'s traceback belongs to ``package``."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module == package or module.startswith(package + ".")


def error_line(error: BaseException) -> str:
    """The one-line message of a user error: its text with line breaks folded (a KeyError's without the quotes
    ``str`` adds), or the exception's name when it has no text. When jsonargparse wraps the error a class raised
    while it instantiated the config (a ValueError listing every union member tried), the class's own error is
    the message."""
    while isinstance(error.__cause__, USER_ERRORS) and _raised_by(error, "jsonargparse"):
        error = error.__cause__
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__


def main(argv: list[str] | None = None, *, handle_errors: bool | None = None) -> None:
    """Run ``cf <argv>`` (default: ``sys.argv[1:]``).

    With ``handle_errors`` (default: only when ``argv`` is None, i.e. the ``cf`` program), a `USER_ERRORS` exception,
    or a tool's ``SystemExit("cf <tool>: ...")``, is printed as one line on stderr and ends the process with status
    2. A leading ``--debug`` (or ``CF_DEBUG=1`` in the environment) lets every exception through with its traceback.
    """
    if handle_errors is None:
        handle_errors = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("CF_DEBUG", "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug = True
        argv.pop(0)
    if debug:
        os.environ["CF_DEBUG"] = "1"  # processes a launcher starts from this one inherit it
    if debug or not handle_errors:
        run(argv)
        return
    try:
        run(argv)
    except USER_ERRORS as error:
        print(f"cf: error: {error_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR_STATUS) from None
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise
        print(" ".join(stop.code.split()), file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR_STATUS) from None


def run(argv: list[str]) -> None:
    """``cf <argv>`` without error handling: exceptions propagate."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv and argv[0] in LIGHTNING_COMMANDS:
        run_lightning_cli(argv)
        return
    if argv and argv[0] in TOOL_MODULES:
        parser = build_tool_parser({argv[0]: TOOL_MODULES[argv[0]]})
    else:
        parser = build_tool_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            print("\nLightning commands: " + ", ".join(f"cf {c} --config <yaml>" for c in LIGHTNING_COMMANDS))
            print("\nErrors print one line; `cf --debug <command> ...` (or CF_DEBUG=1) shows the full traceback.")
            return
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.parse_args([argv[0], "--help"])
    args.func(args)


if __name__ == "__main__":
    main()
