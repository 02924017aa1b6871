"""What operators and users get: probes, Prometheus metrics, request ids, one merged log, the upload page."""

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from support import CASTLE, ROOT, post, sample, wait_for

pytestmark = pytest.mark.slow


def test_probes_follow_redis_and_workers(service, redis_server):
    service.start_web()
    assert requests.get(f"{service.url}/health/live", timeout=5).status_code == 200
    not_ready = requests.get(f"{service.url}/health/ready", timeout=5)
    assert not_ready.status_code == 503 and "no worker" in not_ready.json()["reason"]
    service.start_worker()
    wait_for(lambda: requests.get(f"{service.url}/health/ready", timeout=5).status_code == 200, 10, "readiness")
    assert requests.get(f"{service.url}/health/ready", timeout=5).json() == {"status": "ready"}
    redis_server.stop()
    down = requests.get(f"{service.url}/health/ready", timeout=10)
    assert down.status_code == 503 and "Redis" in down.json()["reason"]
    assert requests.get(f"{service.url}/health/live", timeout=5).status_code == 200
    redis_server.start()


def test_metrics_add_up_across_gunicorn_processes(service):
    service.start_worker()
    web = service.start_web(WEB_PROCESSES="2")
    for _ in range(6):
        assert post(service.url).status_code == 200
    for _ in range(3):
        assert requests.post(f"{service.url}/predict", timeout=10).status_code == 400
    # Scrape several times: whichever process answers, it reports the totals of both.
    for _ in range(4):
        text = requests.get(f"{service.url}/metrics", timeout=10).text
        assert sample(text, "imgclf_requests_total", '{endpoint="predict",status="200"}') == 6
        assert sample(text, "imgclf_requests_total", '{endpoint="predict",status="400"}') == 3
        assert sample(text, "imgclf_request_latency_seconds_count") == 6
        assert sample(text, "imgclf_batch_size_count") == 6
        assert sample(text, "imgclf_inference_seconds_count") == 6
        assert sample(text, "imgclf_queue_wait_seconds_count") == 6
        assert sample(text, "imgclf_result_wakeups_total", '{via="notification"}') == 6
        assert sample(text, "imgclf_queue_depth") == 0
        assert sample(text, "imgclf_workers_alive") == 1
    # The server made the metrics directory: it removes it when it stops (one was left at every start).
    [metrics_dir] = re.findall(r"web_starting .* metrics_dir=(\S+)", service.log_text(web))
    assert Path(metrics_dir).is_dir()
    web.send_signal(signal.SIGTERM)
    assert web.wait(30) == 0
    assert not Path(metrics_dir).exists()


def test_request_id_follows_the_job_through_every_log(service):
    worker = service.start_worker()
    web = service.start_web()
    response = post(service.url, headers={"X-Request-Id": "trace-7f3a"}, params={"top_k": 3})
    assert response.headers["X-Request-Id"] == "trace-7f3a"
    body = response.json()
    assert body["request_id"] == "trace-7f3a" and len(body["predictions"]) == 3
    web_lines = [line for line in service.log_text(web).splitlines() if body["id"] in line or "trace-7f3a" in line]
    worker_lines = [line for line in service.log_text(worker).splitlines() if "trace-7f3a" in line]
    assert {"request_received", "job_queued", "request_done"} <= {line.split()[4] for line in web_lines}
    assert all("rid=trace-7f3a" in line for line in web_lines)
    assert {"batch_claimed", "inference_done", "result_published"} <= {line.split()[4] for line in worker_lines}


def test_logger_tail_merges_every_server(service):
    service.start_worker(LOG_TO_REDIS="1", SERVER_NAME="gpu-box-1")
    service.start_web(LOG_TO_REDIS="1", SERVER_NAME="front-1")
    assert post(service.url).status_code == 200
    env = {**service.env, "LOG_TO_REDIS": "0"}

    def tailed():
        return subprocess.run(
            [sys.executable, "logger.py", "tail", "--from-start", "--no-follow"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    wait_for(lambda: "request_done" in tailed() and "result_published" in tailed(), 10, "the merged log")
    lines = tailed().splitlines()
    assert any(" front-1 run_web_server.py request_done " in line for line in lines)
    assert any(" gpu-box-1 run_model_server.py result_published " in line for line in lines)


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed (`make test` installs it as root)")
def test_upload_page_in_a_real_browser(service, tmp_path):
    from playwright.sync_api import sync_playwright

    service.start_worker()
    service.start_web()
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not a picture")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page()
        page.goto(service.url + "/")
        page.set_input_files("#file", str(CASTLE))
        page.wait_for_selector("#predictions li", timeout=30_000)
        names = page.locator("#predictions .name").all_inner_texts()
        assert names[0] == "castle" and len(names) == 5
        assert page.locator("#preview").is_visible()
        page.screenshot(path=str(tmp_path / "page.png"))
        page.set_input_files("#file", str(not_an_image))
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        assert "not an image" in page.locator("#error").inner_text()
        assert page.locator("#predictions li").count() == 0
        browser.close()
