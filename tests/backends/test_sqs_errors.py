"""SQS failures read as one clear line in stalk's exception tree, and settings come from options
and the environment."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from stalk import BaseCollector, CollectorOptions, fatal
from stalk.collectors.sqs import SQSAdapter, SQSSettings
from stalk.collectors.sqs.wire import translate
from stalk.errors import BackendError, BackendUnavailable, ConfigError, QueueNotFound
from stalk.message import Failure
from stalk.testing.harness import Running, wait_for
from tests.backends.test_sqs import PATIENCE_S, adapter, names, opened, queues, raw_receive, run
from tests.brokers.sqs import REGION, free_port, start_moto

pytestmark = pytest.mark.broker("sqs")


async def open_fails(a: SQSAdapter) -> BaseException:
    try:
        await a.open()
    except Exception as exc:
        return exc
    finally:
        await a.close()
    raise AssertionError("open() succeeded")


def test_missing_queue_is_queue_not_found_naming_it(sqs_endpoint: str) -> None:
    exc = asyncio.run(open_fails(adapter(sqs_endpoint, "no-such-queue")))
    assert isinstance(exc, QueueNotFound)
    assert "'no-such-queue' does not exist" in str(exc) and "create-queue" in str(exc)
    assert "\n" not in str(exc)


def test_queue_url_of_a_missing_queue_is_queue_not_found(sqs_endpoint: str) -> None:
    url = f"{sqs_endpoint}/123456789012/gone"
    assert isinstance(asyncio.run(open_fails(adapter(sqs_endpoint, url))), QueueNotFound)


def test_wrong_region_says_which_region_was_searched(sqs_endpoint: str) -> None:
    source, _ = names()
    queues(sqs_endpoint, source)
    exc = asyncio.run(open_fails(SQSAdapter(source, settings=SQSSettings(
        endpoint_url=sqs_endpoint, region="eu-west-3"))))  # fmt: skip
    assert isinstance(exc, QueueNotFound) and "region eu-west-3" in str(exc)


def test_queue_url_region_conflicting_with_option_is_config_error() -> None:
    a = SQSAdapter("https://sqs.eu-west-1.amazonaws.com/123456789012/q",
                   settings=SQSSettings(region="us-east-1"))  # fmt: skip
    exc = asyncio.run(open_fails(a))
    assert isinstance(exc, ConfigError) and "eu-west-1" in str(exc)


def test_unreachable_endpoint_is_backend_unavailable(aws_env: None) -> None:
    a = SQSAdapter("q", settings=SQSSettings(
        endpoint_url=f"http://127.0.0.1:{free_port()}", region=REGION, max_attempts=1))  # fmt: skip
    exc = asyncio.run(open_fails(a))
    assert isinstance(exc, BackendUnavailable)
    assert "cannot reach SQS" in str(exc) and "endpoint_url" in str(exc)


def test_no_region_anywhere_is_config_error(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    exc = asyncio.run(open_fails(SQSAdapter("q")))
    assert isinstance(exc, ConfigError) and "region" in str(exc)


@pytest.fixture(scope="module")
def strict_endpoint(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second moto server that checks credentials (ours are unknown to it)."""
    log: Path = tmp_path_factory.mktemp("moto-auth") / "moto.log"
    server = start_moto(log, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield server.endpoint
    finally:
        server.stop()


def test_access_denied_is_backend_error_saying_what_to_check(strict_endpoint: str) -> None:
    exc = asyncio.run(open_fails(adapter(strict_endpoint, "q")))
    assert type(exc) is BackendError
    assert "access denied" in str(exc) and "AWS_PROFILE" in str(exc)


def test_throttling_and_server_errors_are_retryable() -> None:
    for code, status in (("ThrottlingException", 400), ("InternalError", 500)):
        error = ClientError(
            {
                "Error": {"Code": code, "Message": "slow down"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "ReceiveMessage",
        )
        assert isinstance(translate(error, "ReceiveMessage", "q", "here"), BackendUnavailable)


def test_missing_error_queue_warns_at_open_and_keeps_the_message(
    sqs_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    source, errors = names()
    (url,) = queues(sqs_endpoint, source)

    async def scenario() -> None:
        with caplog.at_level(logging.WARNING, logger="stalk.collectors.sqs"):
            a = await opened(adapter(sqs_endpoint, source, errors), visibility_s=1)
        assert f"'{errors}' does not exist" in caplog.text
        await a.publish(b"kept")
        await a.close()
        c = BaseCollector(
            adapter(sqs_endpoint, source, errors),
            lambda b: fatal("no"),
            CollectorOptions(polling_period_s=0.05, visibility_timeout_s=1),
        )
        async with Running(c):
            await wait_for(lambda: c.stats.failed_settles >= 1, PATIENCE_S, "the refused route")
        assert c.stats.acked == 0

    run(scenario())
    assert [m["Body"] for m in raw_receive(sqs_endpoint, url, wait_s=2)] == ["kept"]


def test_publish_error_without_error_queue_raises_queue_not_found(sqs_endpoint: str) -> None:
    source, errors = names()
    queues(sqs_endpoint, source)

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source, errors))
        try:
            await a.publish(b"x")
            got = await a.get_messages(1, 1)
            with pytest.raises(QueueNotFound, match=errors):
                await a.publish_error(got[0], Failure.build(got[0], "fatal", "no"))
            await a.release(got[0])
        finally:
            await a.close()

    run(scenario())


def test_settings_from_options_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STALK_SQS_WAIT_TIME_S", "7")
    monkeypatch.setenv("STALK_SQS_REGION", "eu-central-1")
    a = SQSAdapter.from_options("q", None, {"region": "ap-south-1", "create_queues": "true"})
    assert (a.settings.wait_time_s, a.settings.region) == (7, "ap-south-1")
    assert a.settings.create_queues is True
    with pytest.raises(ConfigError, match=r"accepted options: .*endpoint_url"):
        SQSAdapter.from_options("q", None, {"endpont_url": "http://x"})
    with pytest.raises(ConfigError, match="wait_time_s"):
        SQSAdapter.from_options("q", None, {"wait_time_s": "21"})
