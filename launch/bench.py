"""Benchmark dispatcher: `python launch/bench.py <bench> [options]`.

Each bench is a module launch/benches/<name>.py exposing
    add_parser(sub) -> argparse.ArgumentParser   # registers its subcommand and options
    run(args) -> dict                            # runs, prints a readable table, returns results
The dispatcher adds `--out` (default bench/<name>.json) to every subcommand and writes the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `ops`, `launch` importable
    sys.path.insert(0, str(REPO_ROOT))

BENCHES = ("ops", "decode", "train", "learn", "stream", "gpu", "bank")  # modules under launch/benches; missing ones are skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="streamret benchmarks")
    sub = parser.add_subparsers(dest="bench", required=True)
    for name in BENCHES:
        module_name = f"launch.benches.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # bench not written yet; its own import errors still raise
                continue
            raise
        bench_parser = module.add_parser(sub)
        bench_parser.add_argument("--out", type=Path, default=Path("bench") / f"{name}.json",
                                  help="where to write the JSON results")
        bench_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    results = args.run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
