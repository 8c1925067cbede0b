"""Benchmarks, measured side by side in one run: ``python experiments/bench.py {metrics,bilevel,nets,train,infer} [...]``.

Each section lives in its own module (``experiments/bench_<section>.py``) with a ``main(argv)`` function,
so sections can be run alone and added without touching the others. Speed targets live here, never in tests.
"""

from __future__ import annotations

import importlib
import sys

from experiments.cli import huge_pages_for_tensors, retain_freed_memory

SECTIONS = ("metrics", "bilevel", "nets", "train", "infer")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"sections: {', '.join(SECTIONS)}; 'python experiments/bench.py SECTION --help' for options")
        return
    section, rest = argv[0], argv[1:]
    if section not in SECTIONS:
        print(f"error: unknown benchmark section {section!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        raise SystemExit(2)
    try:
        module = importlib.import_module(f"experiments.bench_{section}")
    except ModuleNotFoundError as err:   # the reference implementations are an extra
        print(f"error: the {section} benchmark needs {err.name!r}: pip install -e '.[bench]'", file=sys.stderr)
        raise SystemExit(2) from None
    module.main(rest)


if __name__ == "__main__":
    retain_freed_memory()   # as run.py does: the benchmarks time what a run gets
    huge_pages_for_tensors()
    main()
