"""What every command group of the CLI shares: the one-message error, URL arguments that refuse
credentials, config loading, metric printing, ``--data`` specs and output files."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Sequence


class CLIError(Exception):
    """A problem to report in one message, without a traceback."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def url_arg(value: str) -> str:
    """An argparse type: the URL, refused (with a redacted message) when it embeds credentials."""
    from rsk_dist.storage import refuse_credentials

    try:
        return refuse_credentials(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def redact(text: Any) -> str:
    from rsk_dist.storage import redact as _redact

    return _redact(text)


def one_paragraph(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def load(path: str, overrides: Sequence[str] | None):
    from rsk_dist.config import load_config

    return load_config(path, list(overrides or []))


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def print_metrics(metrics: dict[str, Any], title: str) -> None:
    """Recall@k first, then the other scalar metrics, one per line; and a JSON line."""
    print(title)
    keys = sorted((k for k in metrics if k.startswith("recall@")), key=lambda k: int(k.split("@")[1]))
    keys += [k for k in metrics if k not in keys]
    for key in keys:
        value = metrics[key]
        if isinstance(value, (int, float, str)) or value is None:
            print(f"  {key}: {_format_value(value)}")
    safe = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
            if isinstance(v, (int, float, str, bool)) or v is None}
    print("metrics " + json.dumps(safe, sort_keys=True), flush=True)


def parse_data_spec(spec: str, exclude: Sequence[str] = ()):
    """``KIND:URL[:SPLIT]`` to a :class:`~rsk_dist.config.DataSource`.

    ``shards:s3://bucket/cub200:test``, ``zip:../shared/data/omniglot/x.zip``,
    ``digits:test`` (digits has no URL; ``digits::test`` works too). A trailing ``:WORD`` is
    the split when WORD has no ``/`` (so ``s3://bucket`` keeps its scheme).
    """
    from pydantic import ValidationError

    from rsk_dist.config import ConfigError, DataSource

    kind, sep, rest = spec.partition(":")
    if not sep or not kind:
        raise ConfigError(f"--data {spec!r} is not of the form KIND:URL[:SPLIT] (KIND: shards, zip or digits)")
    url: str | None
    split: str | None = None
    if kind == "digits":
        url, split = None, rest.lstrip(":") or None
    else:
        url = rest
        head, colon, tail = rest.rpartition(":")
        if colon and head and tail and "/" not in tail and not head.endswith(":"):
            url, split = head, tail  # "s3://b/x:test" splits; "s3://b" ("s3" + "//b") does not
    try:
        return DataSource(kind=kind, url=url, split=split, exclude_classes=tuple(exclude))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'data'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"--data {spec!r}: {problems}") from None


def open_out(out: str):
    """A writable binary file for a local path or any fsspec URL."""
    if "://" in out and not out.startswith("file://"):
        import fsspec

        return fsspec.open(out, "wb").open()
    path = Path(out.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


def with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="job config YAML (see jobs/)")
    p.add_argument("--set", action="append", default=[], metavar="a.b=VALUE",
                   help="override a config field (value parsed as YAML); repeatable")


def with_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="KIND:URL[:SPLIT]", type=url_arg,
                   help="e.g. shards:s3://bucket/cub200:test, zip:path.zip, digits:test")
    p.add_argument("--exclude-class", action="append", default=[], metavar="NAME",
                   help="leave out a class (or a top folder of classes); repeatable")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="input size (default: the checkpoint's data.image_size)")
