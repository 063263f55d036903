"""``connectplugin codegen`` (and ``connectplugin-codegen``): regenerate this project's code, or
generate code for your protos."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .protoc import PROJECT_TARGETS, CodegenError, Target, generate

DESCRIPTION = (
    "Generate protobuf messages and Connect clients, handler bases and plugin definitions "
    "(runs protoc from grpcio-tools: pip install 'connectplugin[codegen]'). Without arguments, "
    "regenerate this project's own code (make proto)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proto-path", type=Path, help="root of your .proto tree (like protoc -I)")
    parser.add_argument("--out", type=Path, help="output directory; its old contents are replaced")
    parser.add_argument(
        "--package", default="", help="dotted package the output directory is imported as, e.g. myapp.gen"
    )
    parser.add_argument("files", nargs="*", help=".proto files (default: all under --proto-path)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Generate what ``args`` asks; usage errors through ``parser`` (exit status 2), a failed
    generation prints its reason and returns 1."""
    if args.proto_path is None and args.out is None and not args.package and not args.files:
        targets: tuple[Target, ...] = PROJECT_TARGETS
        if not all(t.proto_path.is_dir() for t in targets):
            parser.error("not a connectplugin source checkout; pass --proto-path and --out")
    elif args.proto_path is None or args.out is None:
        parser.error("--proto-path and --out go together (or give neither to regenerate this project)")
    else:
        targets = (Target(args.proto_path, args.out, args.package),)

    for target in targets:
        try:
            written = generate(target.proto_path, target.out, target.package, args.files)
        except CodegenError as e:
            print(f"{parser.prog}: {e}", file=sys.stderr)
            return 1
        print(f"{_show(target.proto_path)} -> {_show(target.out)}: {len(written)} files")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="connectplugin-codegen", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv), parser)


def _show(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive, on Windows
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
