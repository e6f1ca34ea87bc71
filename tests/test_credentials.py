"""Credentials inside URLs (issue 23, finding 2): refused wherever a URL enters (config, CLI
argument, environment) whatever characters the secret holds, and never printed, not even in
part. Real AWS secrets often hold ``/``; the old pattern could not span one."""
from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsk_dist.cli import main
from rsk_dist.config import ConfigError, load_config
from rsk_dist.storage import StorageError, filesystem, redact, refuse_credentials

MINIMAL = {"data": {"train": {"kind": "digits", "split": "train"}}, "sampler": {"batch_size": 40, "samples_per_class": 4}}
KEY = "AKIAIOSFODNN7EXAMPLE"
SLASH_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

# Any printable secret: URLs hold no whitespace, everything else may appear, / @ : included.
secrets = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")) | st.sampled_from("/@:?#%+=[]"), min_size=1, max_size=60
)
key_ids = st.text(string.ascii_uppercase + string.digits, min_size=1, max_size=24)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(key=key_ids, secret=secrets, scheme=st.sampled_from(["s3", "s3a", "gs", "http", "https"]))
def test_any_secret_is_refused_and_redacted_whole(key, secret, scheme):
    url = f"{scheme}://{key}:{secret}@bucket/prefix/run"
    assert redact(url) == f"{scheme}://***@bucket/prefix/run"
    assert redact(f"cannot read {url}: boom") == f"cannot read {scheme}://***@bucket/prefix/run: boom"
    with pytest.raises(ValueError) as err:
        refuse_credentials(url)
    # The message is the redacted URL and fixed text only: nothing of the secret.
    with pytest.raises(ValueError) as reference:
        refuse_credentials(f"{scheme}://K:S@bucket/prefix/run")
    assert str(err.value) == str(reference.value)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(secret=secrets)
def test_secret_in_a_data_spec_is_redacted(secret):
    spec = f"shards:s3://{KEY}:{secret}@bucket/prefix:test"
    assert redact(spec) == "shards:s3://***@bucket/prefix:test"


@pytest.mark.parametrize(
    "url",
    ["s3://bucket/a@b", "s3://bucket/runs/2026-12-03T08:00", "http://127.0.0.1:9000/x", "http://[::1]:9000/x",
     "file:///tmp/a@b", "memory://x/y", "/local/path", "gs://b/k:v@w"],
)
def test_urls_without_credentials_pass_unchanged(url):
    assert refuse_credentials(url) == url and redact(url) == url


def test_validate_refuses_a_slash_secret_and_never_prints_it(tmp_path, capsys):
    url = f"s3://{KEY}:{SLASH_SECRET}@bucket/runs"
    tree = yaml.safe_load(yaml.safe_dump(MINIMAL))
    tree["run"] = {"storage_path": url}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "credentials inside the URL" in str(err.value)
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    assert code != 0 and "credentials inside the URL" in out.err
    for part in (KEY, SLASH_SECRET, *SLASH_SECRET.split("/")):
        assert part not in out.out + out.err + str(err.value)


@pytest.mark.parametrize("url", [f"s3://{KEY}:{SLASH_SECRET}@bucket/ds", "s3://AKIA:se@cr3t@b/ds"])
def test_gc_dataset_refuses_and_never_prints_the_secret(url, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gc-dataset", url])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "credentials inside the URL" in err
    for part in (SLASH_SECRET, *SLASH_SECRET.split("/"), "se@cr3t", "cr3t"):
        assert part not in err


def test_an_endpoint_variable_with_credentials_is_refused(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{KEY}:{SLASH_SECRET}@127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with pytest.raises(StorageError) as err:
        filesystem("s3://bucket/ds")
    msg = str(err.value)
    assert "AWS_ENDPOINT_URL" in msg and "credentials inside the URL" in msg
    assert KEY not in msg and "K7MDENG" not in msg
