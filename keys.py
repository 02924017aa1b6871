"""Every Redis key and channel the service uses, named in one place for the web server and the workers."""

import os
import socket
import uuid


def process_name() -> str:
    """A name for this process in Redis (a worker's, a web process's backlog record): its host, its pid and a
    random part, so that a process started later with the same pid on the same host is not taken for it."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Keys:
    """Names under one queue; IMAGE_QUEUE doubles as the namespace so two services can share a Redis."""

    def __init__(self, queue: str):
        self.queue = queue  # LIST of job headers (JSON), RPUSH by web, popped from the left
        # LIST of jobs that failed MAX_ATTEMPTS times or were malformed, each in jobs.DeadLetter's envelope
        self.dead = f"{self.queue}:dead"
        self.workers = f"{self.queue}:workers"  # SET of registered worker names
        # HASH web process -> "images admitted and not yet prepared:Redis ms", read by the others' admission
        self.web_backlogs = f"{self.queue}:web_backlogs"
        self.log_stream = f"{self.queue}:log"  # STREAM of log lines from every process (opt-in)
        self.result_prefix = f"{self.queue}:result:"
        self.processing_prefix = f"{self.queue}:processing:"
        self.heartbeat_prefix = f"{self.queue}:worker:"
        self.channel_prefix = f"{self.queue}:notify:"
        self.cancelled_prefix = f"{self.queue}:cancelled:"
        self.status_prefix = f"{self.queue}:status:"
        self.pixels_prefix = f"{self.queue}:pixels:"

    def result(self, job_id: str) -> str:
        """STRING with the result JSON, written with a TTL by the worker (JOB_RESULT_TTL for async jobs,
        else RESULT_TTL) and read by the web server."""
        return self.result_prefix + job_id

    def pixels(self, job_id: str) -> str:
        """STRING of the job's 150528 raw pixel bytes, SET by the web server beside the push, with an expiry a
        grace period past the job's deadline (JobQueue.enqueue); deleted when the job is answered, dead-lettered
        or refused, kept while it waits and is retried."""
        return self.pixels_prefix + job_id

    def processing(self, worker: str) -> str:
        """LIST of the job headers a worker has claimed and not yet acknowledged."""
        return self.processing_prefix + worker

    def finished(self, worker: str) -> str:
        """STRING with the id of the worker's last finished batch (TTL job_queue.LEFT_TTL, an hour), so a retried
        finish, or a late copy of an earlier one, is a no-op."""
        return f"{self.queue}:finished:{worker}"

    def heartbeat(self, worker: str) -> str:
        """HASH describing a live worker; it expires when the worker stops beating."""
        return self.heartbeat_prefix + worker

    def left(self, worker: str) -> str:
        """STRING set when a worker leaves (requeue.lua, in the step that unregisters it), for job_queue.LEFT_TTL:
        a beat of it reaching Redis later registers nothing (beat.lua), a sweep counts no attempt for what a claim
        as late put in its list, and a new worker under that name refuses to start (names are one per process)."""
        return f"{self.queue}:left:{worker}"

    def channel(self, listener: str) -> str:
        """Pub/sub channel of one web process: the worker PUBLISHes finished jobs there (jobs.parse_notification)."""
        return self.channel_prefix + listener

    def cancelled(self, job_id: str) -> str:
        """STRING with a TTL, set by the web server when nobody waits for the job any more (client gone,
        deadline passed); a worker that claims the job skips it."""
        return self.cancelled_prefix + job_id

    def enqueued(self, job_id: str) -> str:
        """STRING set when a request's jobs are pushed (named by its first job), until their pixels expire: a
        push repeated after a lost reply finds it and changes nothing."""
        return f"{self.queue}:enqueued:{job_id}"

    def dead_operation(self, token: str) -> str:
        """STRING with the outcome of one `queue_admin.py dead requeue|purge` (JSON), kept a few minutes: a call
        repeated after a lost reply answers as the first did instead of finding nothing left to do."""
        return f"{self.queue}:dead_operation:{token}"

    def status(self, job_id: str) -> str:
        """STRING 'queued' or 'running' of an async job (POST /jobs) while it has no result: set when it is
        queued, overwritten when a worker claims it, set back when the job is handed back to the queue, deleted
        when its answer is stored; at the latest it expires twice JOB_RESULT_TTL after it was queued."""
        return self.status_prefix + job_id

    def job_deadline(self, job_id: str) -> str:
        """STRING with an async job's deadline (unix seconds), beside its status and as long: a status read that
        finds the job still queued past it answers 504 (job_status.lua). Not in the status value, which web
        processes of earlier versions show as it is. The scripts name it status_prefix .. id .. ':deadline'."""
        return f"{self.status(job_id)}:deadline"
