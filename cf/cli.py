"""The `cf` command.

- `cf fit|validate|test|predict --config configs/....yaml` — LightningCLI: any LightningModule / LightningDataModule
  selected by `class_path` in the YAML; the resolved config is saved next to the logs, so
  `cf fit --config <run>/config.yaml --ckpt_path <ckpt>` resumes a run.
- `cf demo|toy-base|generate|evaluate|convert|data ...` — the project's tools (`cf <command> --help`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# command name -> module with `register(subparsers)`
TOOL_MODULES = {
    "demo": "cf.demo",
    "toy-base": "cf.toy_base",
    "generate": "cf.generate",
    "evaluate": "cf.evaluation.cli",
    "convert": "cf.convert",
    "data": "data.cli",
}


def run_lightning_cli(args: list[str]) -> None:
    """`cf fit|validate|test|predict` (`cf.lightning_cli`)."""
    from cf.lightning_cli import run_lightning_cli as run

    run(args)


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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
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
            return
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.parse_args([argv[0], "--help"])
    args.func(args)


if __name__ == "__main__":
    main()
