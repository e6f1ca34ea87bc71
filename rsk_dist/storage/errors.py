"""Storage errors: :class:`StorageError` and the translation of backend exceptions into one
that names the problem and its fix.

Secrets never appear in what this module raises: messages are built from fixed text, error
codes and the server's message, all passed through :func:`redact`, and callers raise them
``from None`` so no library exception (which may quote a request) is chained.
"""
from __future__ import annotations

import re

from rsk_dist.storage.credentials import credential_source, s3_endpoint_words, protocol_of, redact, s3_endpoint


class StorageError(ValueError):
    """Storage that cannot be used as configured; the message names the problem and the fix."""


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return chain


def _error_code(err: BaseException) -> str | None:
    for e in _exception_chain(err):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
    return None


def _is_unreachable(err: BaseException) -> bool:
    names = {cls.__name__ for e in _exception_chain(err) for cls in type(e).__mro__}
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ConnectionClosedError",
            "ReadTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ConnectionRefusedError",
            "gaierror",
            "FSTimeoutError",
            "TimeoutError",
        }
    )


def explain_s3_error(err: BaseException, url: str, bucket: str, action: str) -> StorageError:
    """A :class:`StorageError` that names the S3 problem behind ``err`` and its fix."""
    where = s3_endpoint_words()
    names = {cls.__name__ for e in _exception_chain(err) for cls in type(e).__mro__}
    code = _error_code(err)
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return StorageError(
            f"no AWS credentials for {redact(url)}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys), or AWS_PROFILE"
        )
    if code is None and _is_unreachable(err):
        var = s3_endpoint()[1] or "AWS_ENDPOINT_URL"
        return StorageError(
            f"cannot reach the S3 endpoint {where} while trying to {action} ({type(err).__name__}: "
            f"connection refused, name not resolved or timed out). Start the object store or fix "
            f"the address in {var} (AWS_ENDPOINT_URL_S3 takes precedence over AWS_ENDPOINT_URL)."
        )
    if code in ("NoSuchBucket",):
        return StorageError(
            f"bucket {bucket!r} does not exist at {where} (for {redact(url)}): create it, or fix "
            "the bucket name in the URL or the endpoint"
        )
    if code in ("InvalidAccessKeyId", "InvalidClientTokenId", "UnrecognizedClientException"):
        return StorageError(
            f"the store at {where} does not know the access key id from {credential_source()} "
            f"({code}): fix AWS_ACCESS_KEY_ID / AWS_PROFILE, or check that AWS_ENDPOINT_URL points "
            "at the store these keys belong to"
        )
    if code == "SignatureDoesNotMatch":
        return StorageError(
            f"the secret key from {credential_source()} does not match its access key id at "
            f"{where} ({code}): fix AWS_SECRET_ACCESS_KEY (or the profile's secret)"
        )
    if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
        return StorageError(
            f"the session token from {credential_source()} is expired or invalid ({code}): "
            "refresh the temporary credentials (AWS_SESSION_TOKEN)"
        )
    if code in ("AccessDenied", "AllAccessDisabled", "403", "Forbidden"):
        return StorageError(
            f"access denied to {action} {redact(url)} at {where} with {credential_source()} "
            f"({code}): grant these credentials s3:ListBucket, s3:GetObject (and s3:PutObject "
            "to write) on the bucket, or use credentials that have them"
        )
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
        return StorageError(
            f"bucket {bucket!r} is in another region than the one configured ({code}): set "
            "AWS_DEFAULT_REGION to the bucket's region"
        )
    if code in ("404", "NoSuchKey", "NotFound") or isinstance(err, FileNotFoundError):
        return StorageError(f"{redact(url)} not found at {where}: {redact(err)}")
    detail = f"{code}: {redact(err)}" if code else f"{type(err).__name__}: {redact(err)}"
    return StorageError(f"cannot {action} {redact(url)} at {where} ({detail})")


def explain_error(err: BaseException, url: str, action: str) -> StorageError:
    protocol = protocol_of(url)
    if protocol in ("s3", "s3a"):
        bucket = re.sub(r"^[a-zA-Z0-9+.-]+://", "", url).split("/", 1)[0]
        return explain_s3_error(err, url, bucket, action)
    return StorageError(f"cannot {action} {redact(url)} ({type(err).__name__}: {redact(err)})")
