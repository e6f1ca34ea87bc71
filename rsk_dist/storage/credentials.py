"""Credentials and URLs: which S3 endpoint and credential source the environment selects, and
:func:`redact`, which removes secrets from any text before it is raised, logged or returned.

S3 settings come from the standard AWS sources only, never from a config field, so no saved
config, manifest or checkpoint can carry a secret: credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or the profile ``AWS_PROFILE`` (botocore's
usual chain: environment, shared credentials/config files, instance roles); the region from
``AWS_DEFAULT_REGION`` (botocore's own) or else ``AWS_REGION`` (which botocore does not read, so
it is passed on); the endpoint of an S3-compatible store (MinIO, Ceph, moto...) from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, which botocore >= 1.31 honours itself (and
a profile's ``endpoint_url`` with it); nothing is passed for them.
"""
from __future__ import annotations

import os
import re

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


# A URL's scheme, and the rest of its token (URLs hold no whitespace).
_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>\S*)")


def _userinfo_end(rest: str) -> int:
    """How many leading characters of ``rest`` (a URL after ``scheme://``) are credentials
    (``user[:secret]@``), 0 for none. Secrets may hold any character, ``/``, ``@``, ``:``, ``?``
    among them, so the authority cannot be cut at the first ``/``: when an ``@`` follows, a
    first segment with an ``@`` or a ``:`` starts credentials, and they run to the last ``@``
    (never a part of the secret is left). The price: an ``http://host:port/...`` URL with an
    ``@`` in its path is taken for one with credentials."""
    at = rest.rfind("@")
    first = rest.split("/", 1)[0]
    return at + 1 if at >= 0 and ("@" in first or ":" in first) else 0


def _redact_url(m: re.Match[str]) -> str:
    rest = m.group("rest")
    end = _userinfo_end(rest)
    if not end:
        return m.group(0)
    return f"{m.group('scheme')}***@{rest[end:]}"


def redact(text: str) -> str:
    """``text`` with the values of the secret AWS variables and any credentials of a URL
    (``user[:secret]@``, whatever characters the secret holds) replaced by ``***``."""
    text = str(text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _URL.sub(_redact_url, text)


def has_credentials(text: str) -> bool:
    """Whether any URL in ``text`` holds credentials before its host."""
    return any(_userinfo_end(m.group("rest")) for m in _URL.finditer(str(text)))


def refuse_credentials(url: str, where: str = "") -> str:
    """``url`` itself, or a ValueError (naming it redacted, and ``where`` it came from) when it
    embeds credentials: a saved config, a submitted job or a log line would carry them."""
    if has_credentials(url):
        raise ValueError(
            f"{redact(url)!r}{where} has credentials inside the URL (user[:secret]@): remove them and use "
            "the standard environment variables (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_SESSION_TOKEN, or GOOGLE_APPLICATION_CREDENTIALS for gs://) or a profile "
            "(AWS_PROFILE) instead"
        )
    return url


def protocol_of(url: str) -> str:
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", str(url))
    return m.group(1).lower() if m else "file"


def s3_endpoint() -> tuple[str | None, str | None]:
    """``(endpoint, variable)``: the S3 endpoint the environment sets and the variable that
    set it, or ``(None, None)`` for AWS's own."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return refuse_credentials(os.environ[name], f" (from {name})"), name
    return None, None


def s3_endpoint_words() -> str:
    endpoint, var = s3_endpoint()
    if endpoint:
        return f"{redact(endpoint)} (set by {var})"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return f"AWS S3 in region {region} (no AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL set)"


def credential_source() -> str:
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables"
    if os.environ.get("AWS_PROFILE"):
        return f"the AWS profile {os.environ['AWS_PROFILE']!r} (AWS_PROFILE)"
    return "the default AWS credential chain (~/.aws/credentials, ~/.aws/config, instance role)"
