"""``batchnorm`` command line: one sub-command per module, imported only when used."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: sub-command -> ("module:function", one-line help). Each function takes argv and returns an
#: exit code; heavy imports (torch, numba, matplotlib) happen inside it.
COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("batchnorm.verify:main", "check the reference against its oracles"),
    "conform": ("batchnorm.testing:cli_main", "check your own batch norm against the reference"),
    "bench": ("batchnorm.bench:main", "time our kernels against PyTorch here (CPU; --device cuda)"),
    "explain": ("batchnorm.experiments.explain:main", "print and draw the backward stage by stage"),
    "experiment": ("batchnorm.experiments.cli:main", "run one experiment, write its records"),
    "report": ("batchnorm.experiments.report:main", "run everything, write DIR/index.html"),
    "doctor": ("batchnorm.doctor_cli:main", "check a trained model's batch norm, say the fix"),
}


def _usage() -> str:
    lines = ["usage: batchnorm COMMAND [options]   (batchnorm COMMAND --help for more)", ""]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # a command is required (as argparse would say): usage, exit 2
        print(f"batchnorm: a command is required\n\n{_usage()}", file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"batchnorm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func = COMMANDS[name][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"batchnorm {name}: not available in this installation ({exc})", file=sys.stderr)
        return 2
    return int(getattr(module, func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
