"""The ``glance`` command.

Each sub-command lives in its own module under ``glance.cli`` with two
functions, ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so ``glance --help`` and light commands
never pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from glance import __version__
from glance.errors import GlanceError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "segment": ("glance.cli.segment", "find and segment lung nodules in a chest CT"),
    "refilter": ("glance.cli.refilter", "re-threshold a finished result from its saved probability maps"),
    "phantom": ("glance.cli.phantom", "write a synthetic chest CT phantom with ground truth"),
    "model-info": ("glance.cli.model_info", "parameters and FLOPs of a model configuration"),
    "models": ("glance.cli.models", "list the registered model versions"),
    "train": ("glance.cli.train", "train or fine-tune a model"),
    "evaluate": ("glance.cli.evaluate", "score a model on labelled data"),
    "calibrate": ("glance.cli.calibrate", "choose a model's default thresholds on validation data"),
    "average": ("glance.cli.average", "average the weights of several runs into one model"),
    "bench": ("glance.cli.bench", "time each stage of segmentation"),
}

log = logging.getLogger("glance")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glance", description="GLANCE lung-nodule segmentation.")
    parser.add_argument("--version", action="version", version=f"glance {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported to add its arguments.
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def one_line(text: str) -> str:
    """``text`` with control characters escaped: DICOM header strings and file names are
    attacker-controlled and must not add lines or terminal escape sequences."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class _TerminalFilter(logging.Filter):
    """What reaches the terminal: GLANCE's own records (all records with --verbose), one line each.
    Libraries' log records and warnings (pydicom, torch) would otherwise surround the one error line."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.verbose and not record.name.startswith("glance"):
            return False
        record.msg, record.args = one_line(record.getMessage()), None
        return True


def _chosen_command(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def _interruptible() -> None:
    """Make SIGINT raise KeyboardInterrupt even when the parent started us with it ignored
    (a shell's background job, some schedulers): otherwise Ctrl-C and the Slicer module's
    Cancel would be silently ignored and the run would finish anyway."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    _interruptible()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen_command(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TerminalFilter(args.verbose))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        handlers=[handler],
    )
    logging.captureWarnings(True)  # library warnings become log records, shown with --verbose
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except GlanceError as exc:
        print(f"glance {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"glance {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
