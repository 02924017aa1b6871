"""stress_test.py: every request is waited for and counted; failures make it exit non-zero."""

import json
import subprocess
import sys

import pytest

import stress_test
from support import ROOT, free_port


def run_tool(*args):
    return subprocess.run(
        [sys.executable, "stress_test.py", "--no-progress", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_open_and_closed_loop_against_the_service(service, tmp_path):
    service.start_worker()
    service.start_web()
    url = f"{service.url}/predict"
    plot = tmp_path / "latency.png"
    closed = run_tool("--url", url, "--requests", "40", "--concurrency", "8", "--json", "--plot", str(plot))
    assert closed.returncode == 0, closed.stderr
    summary = json.loads(closed.stdout)
    assert summary["requests"] == 40 and summary["succeeded"] == 40 and summary["by_status"] == {"200": 40}
    assert summary["throughput_rps"] > 0
    lat = summary["latency_ms"]
    assert lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    opened = run_tool("--url", url, "--requests", "30", "--interval", "0.02")
    assert opened.returncode == 0
    assert "requests   30: 30 succeeded, 0 failed" in opened.stdout
    assert "p99" in opened.stdout


def test_failures_are_counted_and_make_it_exit_non_zero():
    result = run_tool(
        "--url", f"http://127.0.0.1:{free_port()}/predict", "--requests", "5", "--interval", "0.01", "--json"
    )
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["requests"] == 5 and summary["failed"] == 5 and summary["by_status"] == {"ConnectionError": 5}


def test_defaults_reproduce_the_original_test():
    args = stress_test.build_parser().parse_args([])
    assert (args.requests, args.concurrency, args.interval) == (500, None, 0.05)
    assert args.image == ROOT / "jemma.png" and args.image.is_file()


def test_percentiles_use_the_nearest_rank():
    values = list(range(1, 101))
    assert [stress_test.percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert stress_test.percentile([7.0], 99) == 7.0
