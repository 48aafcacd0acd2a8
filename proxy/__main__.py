"""Command line: ``sticky-proxy run | demo | check | route``."""

from __future__ import annotations

import argparse
import sys

from proxy import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sticky-proxy",
        description="Istio's sticky sessions without Istio.",
    )
    parser.add_argument("--version", action="version", version=f"sticky-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="start 3 demo pods and the proxy on 127.0.0.1:8080")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        print("sticky-proxy demo: not built yet (see issue 4)", file=sys.stderr)
        return 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
