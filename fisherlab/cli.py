"""Command-line front end: ``fisherlab record | analyze | plot | train | study``.

Each sub-command lives in ``fisherlab/commands/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Errors in user input
(:class:`fisherlab.errors.UserInputError`, or an ``argparse`` error) print one line on
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fisherlab import __version__
from fisherlab.errors import UserInputError

COMMANDS = {
    "record": "record a training run's per-layer Fisher statistics into an HDF5 run file",
    "analyze": "fit every Kronecker approximation on every recorded step and layer",
    "plot": "draw the figures of an analyzed run or of training histories",
    "train": "train a built-in problem or your model (--model FILE.py:FACTORY) with SGD, Adam or a Kronecker optimizer",
    "study": "the main job: record, analyze and plot in one command",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (torch is slow to import)."""
    parser = _Parser(prog="fisherlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fisherlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"fisherlab.commands.{name}")
            module.add_arguments(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fisherlab`` on ``argv`` (default: ``sys.argv[1:]``) and return its exit status (2 on bad input, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserInputError as exc:
        print(f"fisherlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fisherlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
