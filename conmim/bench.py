"""``conmim-bench`` / ``python -m conmim.bench``: ``python -m benchmarks`` from any directory.

The benchmarks live in the source checkout (they write its benchmarks/results/), not in the installed package:
this finds the checkout an editable install points at and runs its ``benchmarks`` with the same arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path


def checkout() -> Path:
    """The source checkout beside the imported ``conmim`` package, or FileNotFoundError."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise FileNotFoundError(
            f"no benchmarks/ beside {root}: the benchmarks ship with the source checkout, not the wheel "
            "(clone the repository and pip install -e it)"
        )
    return root


def main(argv=None) -> int:
    try:
        root = checkout()
    except FileNotFoundError as exc:
        print(f"conmim-bench: error: {exc}", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
