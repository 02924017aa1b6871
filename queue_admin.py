"""Administer the job queue from the command line, like `rq info` and RQ's failed-job registry.

    python queue_admin.py info [--json]
    python queue_admin.py dead list [--limit N] [--json]
    python queue_admin.py dead requeue (ID... | --all) [--force]
    python queue_admin.py dead purge (ID... | --all)

It works against whatever REDIS_URL and IMAGE_QUEUE say (read once, with Settings.for_program()). Exit status:
0 done; 1 Redis unreachable, a bad setting, an unknown id, or a job left dead; 2 bad usage.
"""

import argparse
import datetime
import json
import os
import sys

import redis

import jobs
import redis_client
from job_queue.dead_letters import DeadLetters
from keys import Keys
from settings import Settings

COUNTS = ("batches", "jobs", "errors", "expired")
RAW_SHOWN = 80  # characters of an entry that holds no job, shown instead of its fields


class Failure(Exception):
    """Something the operator must hear about on stderr, with exit status 1."""


# -- info ------------------------------------------------------------------------------------------------
def collect_info(connection: redis.Redis, keys: Keys) -> dict:
    names = sorted(_text(name) for name in connection.smembers(keys.workers))
    pipe = connection.pipeline(transaction=False)
    pipe.time()  # the heartbeats' beat_at is Redis's time: this host's clock may be off (found by review)
    pipe.llen(keys.queue)
    pipe.llen(keys.dead)
    for name in names:
        pipe.hgetall(keys.heartbeat(name))
        pipe.llen(keys.processing(name))
    (seconds, microseconds), depth, dead, *per_worker = pipe.execute()
    now = seconds + microseconds / 1e6
    workers = [
        _worker(name, {_text(k): _text(v) for k, v in beat.items()}, in_flight, now)
        for name, beat, in_flight in zip(names, per_worker[::2], per_worker[1::2], strict=True)
    ]
    registered = set(names)
    orphan_keys = sorted(
        key
        for key in (
            _text(k)
            # Lists only: a stray key of another type under the prefix made LLEN, and so all of `info`, fail.
            for k in connection.scan_iter(match=_glob_escape(keys.processing_prefix) + "*", count=500, _type="list")
        )
        if key[len(keys.processing_prefix) :] not in registered
    )
    pipe = connection.pipeline(transaction=False)
    for key in orphan_keys:
        pipe.llen(key)
    orphans = [
        {"key": key, "worker": key[len(keys.processing_prefix) :], "jobs": length}
        for key, length in zip(orphan_keys, pipe.execute(), strict=True)
        if length  # a list emptied since the scan no longer exists
    ]
    return {"queue": keys.queue, "queue_depth": depth, "workers": workers, "orphans": orphans, "dead": dead}


def _worker(name, beat, in_flight, now):
    beat_at = _number(beat.get("beat_at"), float)
    return {
        "name": name,
        "alive": bool(beat),  # the heartbeat hash expires HEARTBEAT_TTL after the last beat
        "model": beat.get("model"),
        "batch_size": _number(beat.get("batch_size"), int),
        "ready": beat.get("ready") == "1",
        "pid": _number(beat.get("pid"), int),
        "host": beat.get("host"),
        "heartbeat_age_s": None if beat_at is None else round(now - beat_at, 1),
        **{count: _number(beat.get(count), int) for count in COUNTS},
        "in_flight": in_flight,
    }


def print_info(info: dict, redis_url: str) -> None:
    master = f" (master {info['master']})" if info.get("master") else ""
    print(f"queue {info['queue']} at {redis_client.describe(redis_url)}{master}")
    print(f"waiting jobs  {info['queue_depth']}")
    print(f"dead letters  {info['dead']}" + ("  (python queue_admin.py dead list)" if info["dead"] else ""))
    print(f"\nworkers: {len(info['workers'])} registered")
    if info["workers"]:
        rows = []
        for w in info["workers"]:
            if w["alive"]:
                age = "?" if w["heartbeat_age_s"] is None else f"{w['heartbeat_age_s']:.1f} s ago"
                heartbeat = age if w["ready"] else f"{age} (not ready)"
            else:
                heartbeat = "none: presumed dead, the next sweep requeues its jobs"
            rows.append([w["name"], w["model"], w["batch_size"], heartbeat, *(w[c] for c in COUNTS), w["in_flight"]])
        _table(["NAME", "MODEL", "BATCH", "HEARTBEAT", "BATCHES", "JOBS", "ERRORS", "EXPIRED", "IN FLIGHT"], rows)
    if info["orphans"]:
        print(f"\norphaned processing lists: {len(info['orphans'])}")
        print("  jobs claimed under a worker name that is not registered; a live worker's sweep requeues them")
        print("  (attempt counted; none for a worker that left within the hour, whose late claim put them there:")
        print("  they never ran): its first sweep, HEARTBEAT_TTL after it registered, and every tenth after it.")
        _table(["KEY", "JOBS"], [[o["key"], o["jobs"]] for o in info["orphans"]])
    else:
        print("\norphaned processing lists: none")


# -- dead letters ----------------------------------------------------------------------------------------
def describe_dead(letter: jobs.DeadLetter) -> dict:
    job = letter.job or {}
    entry = {
        "id": letter.id,
        "request_id": job.get("request_id") if letter.id else None,
        "attempts": job.get("attempts") if letter.id else None,
        "enqueued_at": _iso(job.get("enqueued_at")) if letter.id else None,
        "deadline": _iso(job.get("deadline")) if letter.id else None,
        "dead_at": _iso(letter.dead_at),
        "reason": letter.reason,
        "pixels": letter.has_pixels,  # without them the job cannot be requeued
    }
    if letter.id is None:
        raw = letter.raw_bytes()
        entry["raw"] = repr(raw[:RAW_SHOWN]) + (f" ... ({len(raw)} bytes)" if len(raw) > RAW_SHOWN else "")
    return entry


def print_dead(entries: list[dict], total: int) -> None:
    print(f"dead letters: {total}" + (f" (the last {len(entries)})" if len(entries) < total else ""))
    if entries:
        rows = [
            [
                e["id"] or "-",
                e["request_id"] or "-",
                "-" if e["attempts"] is None else e["attempts"],
                e["enqueued_at"] or "-",
                e["dead_at"] or "-",
                (e["reason"] or "unknown")
                + (f"; raw {e['raw']}" if "raw" in e else "")
                + ("" if e["pixels"] or not e["id"] else "; no pixels: cannot be requeued"),
            ]
            for e in entries
        ]
        _table(["ID", "REQUEST ID", "ATTEMPTS", "ENQUEUED", "DEAD SINCE", "REASON"], rows)


def requeue(dead: DeadLetters, ids: list[str] | None, force: bool) -> list[str]:
    outcome = dead.requeue(ids, force)
    print(f"requeued {len(outcome.done)} job(s) at the tail of the queue, attempts 0" + _ids(outcome.done))
    problems = _unknown(ids, outcome)
    if outcome.expired:
        problems.append(
            f"left dead, their deadline passed (a worker would drop them unprocessed): {', '.join(outcome.expired)};"
            f" --force requeues them with a new deadline of {dead.request_timeout:g} s (async jobs: their own)"
        )
    if outcome.no_pixels:
        problems.append(
            f"left dead, their pixels were gone when they died (send the images again): {', '.join(outcome.no_pixels)}"
        )
    if outcome.no_job:
        entries = "entry that holds" if outcome.no_job == 1 else "entries that hold"
        print(f"left {outcome.no_job} {entries} no job with an id")
    return problems


def purge(dead: DeadLetters, ids: list[str] | None) -> list[str]:
    outcome = dead.purge(ids)
    print(f"purged {len(outcome.done)} dead letter(s)" + _ids([i for i in outcome.done if i]))
    return _unknown(ids, outcome)


def _unknown(ids, outcome):
    found = {*outcome.done, *outcome.expired, *outcome.no_pixels}
    return [f"no dead job with id {job_id}" for job_id in dict.fromkeys(ids or []) if job_id not in found]


def _ids(ids):
    return f": {', '.join(ids)}" if ids and len(ids) <= 20 else ""


# -- plumbing --------------------------------------------------------------------------------------------
def _table(header, rows):
    cells = [header, *[["-" if c is None else _printable(str(c)) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    for row in cells:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]))


def _printable(text):
    """Dead letters hold whatever was pushed: no escape sequence of theirs may reach the operator's terminal."""
    return text if text.isprintable() else ascii(text)[1:-1]


def _iso(timestamp):
    if not isinstance(timestamp, (int, float)):
        return None
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return None


def _number(value, kind):
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def _glob_escape(text):
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _text(value):
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _positive(text):
    value = int(text)
    if not 1 <= value <= 2**63 - 1:  # Redis's own bound on a count: past it, Redis answered an error, not a usage
        raise argparse.ArgumentTypeError(f"must be from 1 to {2**63 - 1}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="queue depth, workers, jobs in flight, orphans, dead letters")
    info.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    dead = commands.add_parser("dead", help="the dead-letter list").add_subparsers(dest="action", required=True)
    listing = dead.add_parser("list", help="the newest dead letters, oldest first, with why they died")
    listing.add_argument("--limit", type=_positive, default=50, help="how many of the newest (default 50)")
    listing.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    for action, text in (
        ("requeue", "put dead jobs back at the tail of the queue, attempts 0, nobody waiting for them"),
        ("purge", "delete dead letters"),
    ):
        sub = dead.add_parser(action, help=text)
        sub.add_argument("ids", nargs="*", metavar="ID", help="job ids")
        sub.add_argument("--all", action="store_true", help="every dead letter")
        if action == "requeue":
            sub.add_argument(
                "--force", action="store_true", help="also jobs whose deadline passed, with a new deadline"
            )
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command == "dead" and args.action in ("requeue", "purge") and bool(args.ids) == args.all:
        parser().error(f"dead {args.action}: give either job ids or --all")
    config = Settings.for_program("queue_admin")
    connection = redis_client.connect(config.redis_url, config.redis_socket_timeout)
    keys = Keys(config.image_queue)
    try:
        connection.ping()
        problems = []
        if args.command == "info":
            info = collect_info(connection, keys)
            master = redis_client.master_address(connection)  # through Sentinel: which Redis answered
            if master:
                info["master"] = master
            if args.json:
                print(json.dumps({"redis": redis_client.describe(config.redis_url), **info}, indent=2))
            else:
                print_info(info, config.redis_url)
        else:
            dead = DeadLetters(connection, config)
            ids = None if args.action != "list" and args.all else getattr(args, "ids", None)
            if args.action == "list":
                total = dead.count()
                entries = [describe_dead(letter) for letter in dead.newest(args.limit)]
                if args.json:
                    print(json.dumps({"queue": keys.queue, "dead": total, "entries": entries}, indent=2))
                else:
                    print_dead(entries, total)
            elif args.action == "requeue":
                problems = requeue(dead, ids, args.force)
            else:
                problems = purge(dead, ids)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _fail(f"cannot reach Redis at {redis_client.describe(config.redis_url)}: {exc}")
    except redis.RedisError as exc:
        return _fail(f"Redis at {redis_client.describe(config.redis_url)} answered with an error: {exc}")
    for problem in problems:
        print(f"queue_admin: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _fail(message):
    print(f"queue_admin: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `queue_admin.py info | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
