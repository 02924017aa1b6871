"""One log format for every process: timestamp, server, the started script, action, key=value details."""

import json
import os
import re
import subprocess
import sys
import time

from keys import Keys
from settings import Settings
from support import ROOT, wait_for

LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<level>\w+)\s+(?P<server>\S+) (?P<script>\S+) "
    r"(?P<action>\w+)(?P<details>.*)$"
)


def run_script(tmp_path, body, **env):
    script = tmp_path / "some_tool.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom logger import log, bind\n{body}\n")
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", **env},
        check=True,
    )
    return result.stderr.strip().splitlines()


def test_text_line_carries_time_server_script_action_and_details(tmp_path):
    [line] = run_script(
        tmp_path, 'log("job_queued", id="abc", batch_size=3, ms=12.345, note="two words")', SERVER_NAME="web-1"
    )
    match = LINE.match(line)
    assert match, line
    assert match["server"] == "web-1"
    assert match["script"] == "some_tool.py"  # the script that was started, not logger.py
    assert match["action"] == "job_queued"
    assert match["details"] == ' id=abc batch_size=3 ms=12.3 note="two words"'


def test_server_name_defaults_to_host_and_role(tmp_path):
    [line] = run_script(tmp_path, 'log("x")')
    import socket

    assert LINE.match(line)["server"] == f"{socket.gethostname()}-client"


def test_bound_request_id_is_on_every_line_until_rebound(tmp_path):
    lines = run_script(tmp_path, 'bind(rid="r1")\nlog("a")\nlog("b")\nbind(rid="r2")\nlog("c")')
    assert [LINE.match(line)["details"] for line in lines] == [" rid=r1", " rid=r1", " rid=r2"]


def test_json_format(tmp_path):
    [line] = run_script(
        tmp_path, 'log("inference_done", level="WARNING", batch_size=4)', LOG_FORMAT="json", SERVER_NAME="w"
    )
    record = json.loads(line)
    assert record["action"] == "inference_done" and record["batch_size"] == 4 and record["level"] == "WARNING"
    assert record["server"] == "w" and record["script"] == "some_tool.py"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", record["ts"])


def test_level_filter(tmp_path):
    lines = run_script(tmp_path, 'log("quiet", level="DEBUG")\nlog("loud", level="ERROR")', LOG_LEVEL="WARNING")
    assert len(lines) == 1 and "loud" in lines[0]


def test_tail_follows_the_merged_log_across_a_redis_restart(redis_server, real_redis, tmp_path):
    # It ended with redis-py's traceback, and what was logged after Redis came back never appeared.
    stream = Keys(Settings().image_queue).log_stream
    entry = {"ts": "2026-11-29T12:00:00.000Z", "level": "INFO", "server": "s1", "script": "run_web_server.py"}
    real_redis.xadd(stream, {**entry, "action": "before_restart"})
    out = tmp_path / "tail.out"
    with out.open("w") as sink:
        tail = subprocess.Popen(
            [sys.executable, "logger.py", "tail", "--from-start"],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": redis_server.url, "LOG_TO_REDIS": "0"},
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        wait_for(lambda: "before_restart" in out.read_text(), 20, "the first line")
        redis_server.stop()
        time.sleep(0.5)  # the tail's read fails, and it waits to try again
        redis_server.start()
        redis_server.client().xadd(stream, {**entry, "action": "after_restart"})
        wait_for(lambda: "after_restart" in out.read_text(), 20, "the line logged after the restart")
        assert tail.poll() is None
    finally:
        tail.terminate()
        stderr = tail.communicate(timeout=10)[1]
    assert "Traceback" not in stderr and "logger: Redis unavailable" in stderr
