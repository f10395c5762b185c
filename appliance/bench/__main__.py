"""``python -m appliance.bench NAME [args]``: run the benchmark module ``appliance.bench.NAME``."""

from __future__ import annotations

import importlib
import sys

from appliance.bench.harness import benchmarks


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    available = benchmarks()
    if not args or args[0] in ("-h", "--help", "--list"):
        if args and args[0] == "--list":
            print("\n".join(available))
            return 0
        print(
            f"usage: python -m appliance.bench NAME [--json] [options]; NAME is one of {', '.join(available)}",
            file=sys.stderr,
        )
        return 2
    name, rest = args[0], args[1:]
    if name not in available:
        print(f"no benchmark named {name!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"appliance.bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
