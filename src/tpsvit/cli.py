"""The ``tpsvit`` command: one sub-command per module in :mod:`tpsvit.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from tpsvit.errors import TPSError

# Sub-command name -> module under tpsvit.commands. Each module defines ``add_arguments(parser)`` and ``run(args)``
# and a one-line module docstring used as the help text. Modules are imported lazily so `tpsvit --help` is fast.
COMMANDS = {
    "demo": "demo",
    "eval": "evaluate",
    "bench": "bench",
    "flops": "flops",
    "train": "train",
    "viz": "viz",
    "export": "export",
    "calibrate": "calibrate",
}


def _load(name: str):
    return importlib.import_module(f"tpsvit.commands.{COMMANDS[name]}")


def version() -> str:
    """The installed package's version (importlib.metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("tpsvit")
    except metadata.PackageNotFoundError:
        import tpsvit

        return tpsvit.__version__


def _summary(name: str) -> str:
    """First docstring line of a command module, read from its source without importing it (no torch import)."""
    import ast
    from importlib.util import find_spec

    spec = find_spec(f"tpsvit.commands.{COMMANDS[name]}")
    if spec is None or not spec.origin:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or name
    return doc.strip().splitlines()[0]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` a command name, only that command's module is imported (its options parsed), and
    with ``only=""`` none is (the commands are listed from their docstrings: `tpsvit --help` without torch)."""
    parser = argparse.ArgumentParser(prog="tpsvit", description="Token Pruning & Squeezing for timm ViTs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help=_summary(name) if only == "" else f"(run `tpsvit {name} --help`)",
                           add_help=False)
            continue
        try:
            module = _load(name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("tpsvit.commands"):
                continue  # a command not built yet
            raise
        doc = (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=doc)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tpsvit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        result = args._run(args)
    except TPSError as err:
        print(f"tpsvit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tpsvit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
