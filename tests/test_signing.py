"""Signed webhooks: what a destination receives verifies with an independent implementation
(the `standardwebhooks` package), on every attempt, with each of a queue's secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
import yaml
from conftest import run_cli
from standardwebhooks import Webhook

OLD = "whsec_" + base64.b64encode(b"o" * 32).decode()
NEW = "whsec_" + base64.b64encode(bytes(range(24))).decode()
CONFIG = {"queues": {"hooks": {"size": 2, "retry": {"attempts": 1, "backoff": 0.2},
                               "signing": {"secrets": [NEW, OLD]}}}}


async def test_every_attempt_is_signed_with_every_secret_and_one_id(make_daemon, make_sink):
    sink = await make_sink(script=[(500, {})])  # the first attempt fails, the retry succeeds
    d = await make_daemon(CONFIG)
    payload = {"event": "order.paid", "order": 42}
    status, body, _ = await d.post({"url": sink.url("/hook"), "queue": "hooks", "id": "order-42",
                                    "method": "POST", "json": payload,
                                    "headers": {"Webhook-Signature": "v1,forged"}})
    assert status == 200, body
    first, second = await sink.wait_for(2)
    for got in (first, second):
        for secret in (NEW, OLD):  # a receiver that knows either one accepts
            assert Webhook(secret).verify(got.body, got.headers) == payload
        assert got.headers["webhook-id"] == "order-42"  # stable across retries
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 30
        signatures = got.headers["webhook-signature"].split(" ")
        assert len(signatures) == 2 and "v1,forged" not in signatures  # the job's own gave way
        assert [k for k, _ in got.raw_headers if k.lower() == b"webhook-signature"] == \
            [b"webhook-signature"]
    # the formula of the specification, written out: base64(HMAC-SHA256(key, id.ts.body))
    key = base64.b64decode(NEW.removeprefix("whsec_"))
    content = b"order-42.%s.%s" % (second.headers["webhook-timestamp"].encode(), second.body)
    assert second.headers["webhook-signature"].split(" ")[0] == \
        "v1," + base64.b64encode(hmac.digest(key, content, hashlib.sha256)).decode()


async def test_a_binary_body_is_signed_as_sent_and_other_queues_are_not_signed(make_daemon,
                                                                               make_sink):
    sink = await make_sink()
    d = await make_daemon(CONFIG)
    raw = bytes(range(256))
    for queue in ("hooks", None):
        job = {"url": sink.url("/bin"), "method": "PUT", "body": base64.b64encode(raw).decode(),
               **({"queue": queue} if queue else {})}
        status, body, _ = await d.post(job)
        assert status == 200, body
    # two queues deliver concurrently, so the order of arrival is not the order of submission
    plain, signed = sorted(await sink.wait_for(2), key=lambda r: "webhook-id" in r.headers)
    assert signed.body == raw and plain.body == raw
    key = base64.b64decode(OLD.removeprefix("whsec_"))
    content = b"%s.%s.%s" % (signed.headers["webhook-id"].encode(),
                             signed.headers["webhook-timestamp"].encode(), raw)
    assert "v1," + base64.b64encode(hmac.digest(key, content, hashlib.sha256)).decode() in \
        signed.headers["webhook-signature"].split(" ")
    assert not any(k.lower().startswith("webhook-") for k in plain.headers)


@pytest.mark.parametrize(("secret", "why"), [
    ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
    ("whsec_not*base64", "valid base64"),
    ("whsec_" + base64.b64encode(b"short").decode(), "24-64 bytes, got 5"),
])
def test_a_bad_secret_is_a_config_error_that_names_the_key_not_the_secret(tmp_path, secret, why):
    p = tmp_path / "bwp.yaml"
    p.write_text(yaml.safe_dump({"queues": {"hooks": {"signing": {"secrets": [NEW, secret]}}}}))
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 1 and "queues.hooks.signing.secrets[1]" in err and why in err
    assert secret.removeprefix("whsec_") not in out + err


def test_check_shows_signing_without_the_secrets(tmp_path):
    p = tmp_path / "bwp.yaml"
    p.write_text(yaml.safe_dump(CONFIG))
    code, out, err = run_cli("check", "-c", str(p))
    assert code == 0, err
    assert "hooks: 2 workers" in out and "signed (Standard Webhooks, 2 secrets)" in out
    assert NEW not in out and OLD.removeprefix("whsec_") not in out


async def test_a_redirect_to_another_origin_is_not_signed(make_daemon, make_sink):
    elsewhere = await make_sink()
    origin = await make_sink(script=[(307, {"Location": elsewhere.url("/moved")})])
    d = await make_daemon({**CONFIG, "client": {"follow_redirects": True}})
    status, body, _ = await d.post({"url": origin.url("/hook"), "queue": "hooks",
                                    "method": "POST", "json": {"a": 1}})
    assert status == 200, body
    (first,), (moved,) = await origin.wait_for(1), await elsewhere.wait_for(1)
    assert "webhook-signature" in first.headers
    assert not any(k.lower().startswith("webhook-") for k in moved.headers)
