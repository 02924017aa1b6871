"""Settings: read from the environment once, and a bad value stops the start with the variable's name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import redis_client
from settings import Settings


def test_the_environment_overrides_the_defaults():
    config = Settings.from_env({"PORT": "8080", "LOG_TO_REDIS": "1", "LOG_LEVEL": "debug"})
    assert (config.port, config.log_to_redis, config.log_level) == (8080, True, "DEBUG")
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"PRECISION": "bf16", "RECHECK_MARGIN": "0.02"}).recheck_margin == 0.02


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"PORT": "abc"}, "PORT must be an integer"),
        ({"WAIT_MODE": "push"}, "WAIT_MODE must be one of"),
        ({"RESULT_TTL": "0"}, "RESULT_TTL must be at least 1"),
        ({"FALLBACK_POLL_AFTER": "0"}, "FALLBACK_POLL_AFTER must be more than 0"),
        ({"REQUEST_TIMEOUT": "nan"}, "REQUEST_TIMEOUT must be a finite number"),
        ({"DEAD_LETTER_MAX": "0"}, "DEAD_LETTER_MAX must be at least 1"),
        ({"HEARTBEAT_TTL": "5.4"}, "HEARTBEAT_TTL must be longer than HEARTBEAT_INTERVAL"),
        ({"MAX_BUFFERED_BYTES": "1000"}, r"MAX_BUFFERED_BYTES \(1000\) must be at least MAX_UPLOAD_BYTES"),
        ({"RECHECK_MARGIN": "0.02"}, "RECHECK_MARGIN is for PRECISION=bf16"),  # f32, the default, has nothing to redo
        ({"RECHECK_MARGIN": "1", "PRECISION": "bf16"}, "RECHECK_MARGIN must be below 1"),
        ({"RECHECK_MARGIN": "-0.1", "PRECISION": "bf16"}, "RECHECK_MARGIN must be a finite number, at least 0"),
        ({"REDIS_URL": "127.0.0.1:6379"}, "REDIS_URL is not a Redis URL: redis://"),  # was a traceback at first use
        ({"REDIS_URL": "redis://:s3cret@127.0.0.1:99999/0"}, "REDIS_URL is not a Redis URL"),
        ({"REDIS_URL": "redis://:s3cret/x#y@redis:6379/0"}, "REDIS_URL is not a Redis URL"),  # "port" 's3cret
        ({"REDIS_URL": "redis+sentinel://:s3cret@s1:26379,s2/imgclf"}, r"not a Sentinel URL \(each sentinel must"),
        ({"REDIS_URL": "redis+sentinel://:s3cret@s1:26379"}, r"not a Sentinel URL \(the path must be /service"),
        ({"REDIS_URL": "redis+sentinel://:s3cret@s1:26379/imgclf/x"}, r"not a Sentinel URL \(the path must be"),
        # A / in the password, unencoded: the rest would have been taken for the name of the master (review).
        ({"REDIS_URL": "redis+sentinel://app:20/s3cret@s1:26379/0"}, r"not a Sentinel URL \(the path must be"),
        ({"REDIS_URL": "redis+sentinel://:s3cret@s1:26379/imgclf?ssl=true"}, r"not a Sentinel URL \(it takes no"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(environ, message):
    with pytest.raises(ValueError, match=message) as refused:
        Settings.from_env(environ)
    assert "s3cret" not in str(refused.value)


def test_a_sentinel_url_names_the_sentinels_the_master_and_its_database():
    url = "redis+sentinel://app:p%40ss@s1.internal:26379,[::1]:26380/imgclf/2"
    assert Settings.from_env({"REDIS_URL": url}).redis_url == url
    place = redis_client.SentinelURL.parse(url)
    assert place.sentinels == [("s1.internal", 26379), ("::1", 26380)]
    assert (place.service, place.db, place.username, place.password) == ("imgclf", 2, "app", "p@ss")
    assert redis_client.describe(url) == "redis+sentinel://s1.internal:26379,[::1]:26380/imgclf/2"  # for logs
    assert redis_client.SentinelURL.parse("redis+sentinel://s1:26379/imgclf").db == 0


def test_a_whole_number_setting_built_in_code_refuses_a_fraction():
    # from_env refuses "2.5" as it parses; Settings(...) in code must refuse it too, not fail at the first batch.
    with pytest.raises(ValueError, match="INFERENCE_BATCH_SIZE must be a whole number"):
        Settings(inference_batch_size=2.5)
    assert Settings(inference_batch_size=3).inference_batch_size == 3


@pytest.mark.parametrize("name", ["batch_size", "request_timeout"])
def test_a_number_setting_built_in_code_refuses_true_or_false(name):
    # Python counts True as 1: Settings(batch_size=True) was a worker taking one job at a time without a word.
    with pytest.raises(ValueError, match=f"{name.upper()} must be a number, not True"):
        Settings(**{name: True})


def test_a_yes_no_setting_built_in_code_refuses_anything_but_true_or_false():
    with pytest.raises(ValueError, match="LOG_TO_REDIS must be True or False, not '0'"):
        Settings(log_to_redis="0")
    assert Settings(log_to_redis=True).log_to_redis is True


@pytest.mark.parametrize("program", ["run_web_server", "run_model_server", "simple_request", "stress_test"])
def test_a_program_with_a_bad_setting_stops_saying_which_without_a_traceback(program):
    root = Path(__file__).resolve().parent.parent
    environ = {**os.environ, "REDIS_URL": "redis://:s3cret@127.0.0.1:99999/0"}
    result = subprocess.run(
        [sys.executable, str(root / f"{program}.py")],
        cwd=root,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        result.stderr.startswith(f"{program}: REDIS_URL is not a Redis URL: redis://") and "s3cret" not in result.stderr
    )
