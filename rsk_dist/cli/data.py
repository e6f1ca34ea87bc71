"""Data commands: ``ingest`` a data set as shards plus index, ``gc-dataset`` its replaced versions."""
from __future__ import annotations

import argparse
import ast
import re
import sys
import time
from pathlib import Path
from typing import Any

from rsk_dist.cli.common import redact, url_arg
from rsk_dist.console import duration

LAYOUTS = ("folders", "cub200", "cars196", "sop", "inaturalist", "vehicleid")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class IngestProgress:
    """``ingest``'s progress on stderr: a line at the start, then at most one every
    ``every_s`` seconds, and the last: files, bytes, rate and ETA."""

    def __init__(self, every_s: float = 5.0, out=None) -> None:
        self.every_s, self.out = every_s, out or sys.stderr
        self.started = self.last = None
        self.bytes_at_start = 0

    def __call__(self, files: int, files_total: int, done: int, total: int) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started, self.bytes_at_start = now, done
        elif done < total and now - self.last < self.every_s:
            return
        self.last = now
        rate = (done - self.bytes_at_start) / max(now - self.started, 1e-9)
        eta = f", ETA {duration((total - done) / rate)}" if rate > 0 and done < total else ""
        speed = f", {_size(rate)}/s" if rate > 0 else ""
        percent = 100 * done / total if total else 100
        print(f"ingest: {files}/{files_total} files, {_size(done)} of {_size(total)} ({percent:.0f}%){speed}{eta}",
              file=self.out, flush=True)


def cmd_ingest(args: argparse.Namespace) -> int:
    import dataclasses

    from rsk_dist.ingest import ingest

    kwargs: dict[str, Any] = {"overwrite": args.overwrite, "on_progress": IngestProgress()}
    if args.shard_mb is not None:
        kwargs["shard_bytes"] = int(args.shard_mb * 2**20)
    if args.threads is not None:
        kwargs["threads"] = args.threads
    if args.default_split is not None:
        kwargs["default_split"] = args.default_split
    result = ingest(args.source, args.target_url, layout=args.layout, **kwargs)
    fields = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
    if isinstance(fields, dict):
        for key, value in fields.items():
            print(f"{key}: {value}")
    elif fields is not None:
        print(fields)
    print(redact(f"ingested {args.source} into {args.target_url} ({args.layout})"), file=sys.stderr)
    return 0


def cmd_gc_dataset(args: argparse.Namespace) -> int:
    from rsk_dist.ingest import gc_dataset

    removed = gc_dataset(args.url, keep_last=args.keep_last)
    for folder in removed:
        print(f"removed {folder}")
    print(redact(f"{args.url}: removed {len(removed)} replaced version(s), kept the last {args.keep_last}"),
          file=sys.stderr)
    return 0


def _layouts_help() -> str:
    """The folder layouts ``ingest`` reads, from :mod:`rsk_dist.ingest.layouts`' docstring, read
    without importing it (it imports torch: seconds, for every command)."""
    source = Path(__file__).resolve().parent.parent / "ingest" / "layouts.py"
    doc = ast.get_docstring(ast.parse(source.read_text())) or ""
    return re.sub(r":\w+:`([^`]*)`", r"\1", doc[doc.find("Layouts"):]).replace("``", "")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="write a data set as shards plus index to any fsspec URL",
                       epilog=_layouts_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pack the images of SOURCE into large shard objects plus a Parquet index\n"
                                   "at TARGET_URL, which training reads by ranged requests. Re-running is a\n"
                                   "no-op; running an interrupted ingest again completes it. Progress (files,\n"
                                   "bytes, ETA) goes to stderr.")
    p.add_argument("source", metavar="SOURCE", type=url_arg,
                   help="the data set's folder or .zip, in the --layout given (see below)")
    p.add_argument("target_url", metavar="TARGET_URL", type=url_arg, help="e.g. s3://bucket/cub200")
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--shard-mb", type=float, default=None, metavar="MB", help="target shard size (default 64)")
    p.add_argument("--threads", type=int, default=None, help="parallel uploads")
    p.add_argument("--default-split", default=None, metavar="SPLIT",
                   help="split of images the layout does not assign one (default train)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different ingest at TARGET_URL: the new version is written beside "
                        "the old one, which jobs already running keep reading (see gc-dataset)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("gc-dataset", help="delete the shards of replaced ingests of a dataset")
    p.add_argument("url", metavar="URL", type=url_arg, help="the dataset, e.g. s3://bucket/cub200")
    p.add_argument("--keep-last", type=int, default=1, metavar="N",
                   help="versions to keep, the current one included (default 1). Old versions are "
                        "read by jobs started before the overwrite: run this once those ended")
    p.set_defaults(func=cmd_gc_dataset)
