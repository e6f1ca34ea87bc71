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


# scheme://userinfo@ : a user name (often an access key id) and maybe a password in a URL
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s?#]+@")


def redact(text: str) -> str:
    """``text`` with the values of the secret AWS variables and any ``user[:password]@`` of a
    URL replaced by ``***``."""
    text = str(text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub(r"\g<scheme>***@", text)


def refuse_credentials(url: str) -> str:
    """``url`` itself, or a ValueError (naming it redacted) when it embeds credentials: a saved
    config, a submitted job or a log line would carry them."""
    if _USERINFO.search(str(url)):
        raise ValueError(
            f"{redact(url)!r} has credentials inside the URL (user[:secret]@): remove them and use "
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
            return os.environ[name], name
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
