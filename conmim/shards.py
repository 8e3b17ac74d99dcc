"""``conmim-shards SRC DEST``: write an image folder or a file list as tar shards (WebDataset layout) for
``--data``; see :func:`conmim.data.shards.write_shards` and docs/data.md."""

from __future__ import annotations

import argparse
import sys

from conmim.data import scan as scanmod
from conmim.data.scan import printable
from conmim.data.shards import _size, write_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="conmim-shards",
        description="Write an image folder or file list as tar shards (WebDataset layout) for --data.",
    )
    p.add_argument("src", help="image folder or file list (text file, one path per line)")
    p.add_argument("dest", help="output folder (new or empty)")
    p.add_argument("--shard-size", type=_size, default="256MB", help="target bytes per shard (default 256MB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one shuffle of the samples (default 0)")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar (default shard)")
    p.add_argument("--scan", choices=scanmod.SCANS, default="content", help="how the source is checked")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no excluded-file lines")
    a = p.parse_args(argv)
    try:
        index = write_shards(a.src, a.dest, a.shard_size, a.seed, a.prefix, a.scan, verbose=not a.quiet)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"conmim-shards: error: {printable(exc)}", file=sys.stderr)
        return 2
    n, b = index["samples"], index["bytes"]
    print(f"{n} images, {b / 2**20:.1f} MiB in {len(index['shards'])} shard(s); --data {index['pattern']}")
    if index["excluded"]:
        print(f"{index['excluded']} file(s) excluded (unreadable or not images); see the lines above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
