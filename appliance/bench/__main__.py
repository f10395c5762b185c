"""``python -m appliance.bench NAME [args]``: run the benchmark module ``appliance.bench.NAME``."""

from __future__ import annotations

import importlib
import re
import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m appliance.bench NAME [--json] [options]", file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        print(f"not a benchmark name: {name!r}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"appliance.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"appliance.bench.{name}":
            raise
        print(f"no benchmark named {name!r}", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
