"""Every knob of the service, as one immutable `Settings` read once from the environment at start-up.

Each field's environment variable is its name in capitals (`redis_url` <- REDIS_URL). Entry points call
`Settings.from_env()` once and hand the result to every component they build; nothing else reads
os.environ for configuration, and tests build `Settings(...)` with what they need.
"""

import dataclasses
import os
from dataclasses import dataclass

import redis_client


@dataclass(frozen=True)
class Settings:
    # Redis: a password or TLS goes in the URL (redis://:pass@host:6379/0, rediss://...); a master Sentinel
    # watches is named by its sentinels (redis+sentinel://s1:26379,s2:26379/mymaster/0, redis_client.py).
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_socket_timeout: float = 5.0
    # How long a worker blocks waiting for the first job of a batch; kept below the socket timeout.
    block_timeout: float = 4.0

    # Web server
    host: str = "127.0.0.1"
    port: int = 5000
    web_processes: int = 1
    # Open connections per web process (gevent: a waiting request costs a greenlet, not an OS thread).
    web_connections: int = 2000
    web_redis_connections: int = 16
    # Niceness of the web processes. 0: under overload a reniced web tier is starved by the model and cannot
    # keep deadlines (measured: at 2x capacity, nice 10 answered 285 of 522 requests late, nice 0 none).
    web_nice: int = 0
    request_timeout: float = 30.0
    max_upload_bytes: int = 10 * 1024 * 1024
    # Request bodies one web process holds in memory at once (each read whole before the app runs, and let go of
    # once its images are prepared); a body that does not fit is refused 503 `uploads_full` at once, unread.
    max_buffered_bytes: int = 256 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_queue_length: int = 500
    # Images in one request (several `image` fields on /predict, a V2 tensor of shape [n]).
    max_images_per_request: int = 32
    # Seconds an async job's result (POST /jobs) is kept; a job not started within it is answered 504.
    job_result_ttl: int = 3600
    # Headers, and then the body, must arrive within this many seconds of the request's start: else the
    # connection is closed (408 if part of a request had arrived). Never more than REQUEST_TIMEOUT for the body.
    client_read_timeout: float = 10.0
    # Admission: refuse (503) when the expected queue wait exceeds this fraction of the request's remaining time.
    admission_wait_fraction: float = 0.8
    # "notify": pub/sub wake-ups with polling only as a fallback; "poll": plain polling (for comparison).
    wait_mode: str = "notify"
    poll_interval: float = 0.25
    fallback_poll_after: float = 5.0
    fallback_poll_max: float = 10.0
    # Seconds of silence on the notification connection before the listener PINGs it; three times as long
    # without an answer and it connects again.
    listener_ping_interval: float = 10.0

    # Queue protocol
    image_queue: str = "image_queue"
    result_ttl: int = 60
    max_attempts: int = 3
    # Dead-lettered jobs kept for inspection (~150 KB each: their raw pixels); the oldest are dropped beyond this.
    dead_letter_max: int = 500
    heartbeat_interval: float = 5.0
    heartbeat_ttl: float = 15.0
    # A batch still running after this long is taken for a hung model: handed back, and the worker process ends.
    max_batch_seconds: float = 120.0

    # Model worker
    model: str = "auto"
    # Empty: Keras's ImageNet download (or its cache); a path: an .h5 file; "none": random weights.
    model_weights: str = ""
    model_cache_dir: str = os.path.expanduser("~/.cache/image-classifier")
    batch_size: int = 32
    # Images per call to the runtime, a claimed batch run a slice at a time; 0: the runtime's own (Predictor.slice).
    inference_batch_size: int = 0
    # "auto": OpenVINO when it is installed and passes its self-check against Keras, else TensorFlow;
    # "openvino" refuses to start without it; "tensorflow": Keras on TensorFlow as the original ran it.
    runtime: str = "auto"
    # "bf16" (OpenVINO, on CPUs with BF16 or AMX) is about twice as fast, at some cost in agreement.
    precision: str = "f32"
    # With bf16: an image whose two best classes are less than this probability apart is classified again in
    # f32 (0: never). bf16's rounding reorders near ties and little else; the cost is an f32 run for each near
    # tie, or for each image while near ties are common (README: "What bf16 trades").
    recheck_margin: float = 0.0
    tf_intra_op_threads: int = 0
    tf_inter_op_threads: int = 0

    # Logging
    server_name: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    log_to_redis: bool = False
    log_stream_maxlen: int = 100_000

    def __post_init__(self):
        for name, allowed in (
            ("wait_mode", ("notify", "poll")),
            ("log_format", ("text", "json")),
            ("log_level", ("DEBUG", "INFO", "WARNING", "ERROR")),
            ("runtime", ("auto", "openvino", "tensorflow")),
            ("precision", ("f32", "bf16")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name.upper()} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in (int, float) and isinstance(value, bool):  # Python counts True as 1
                raise ValueError(f"{field.name.upper()} must be a number, not {value!r}")
            if field.type is bool and not isinstance(value, bool):  # "0" would be true
                raise ValueError(f"{field.name.upper()} must be True or False, not {value!r}")
            if field.type is int and not isinstance(value, int):  # from_env parses ints; Settings(...) may not
                raise ValueError(f"{field.name.upper()} must be a whole number, not {value!r}")
            if field.type in (int, float) and not (value >= 0 and value != float("inf")):
                raise ValueError(f"{field.name.upper()} must be a finite number, at least 0, not {value!r}")
        if self.max_buffered_bytes < self.max_upload_bytes:  # an upload of the largest size could never be read
            raise ValueError(
                f"MAX_BUFFERED_BYTES ({self.max_buffered_bytes}) must be at least "
                f"MAX_UPLOAD_BYTES ({self.max_upload_bytes})"
            )
        at_least_one = (
            "batch_size",
            "max_queue_length",
            "dead_letter_max",
            "max_attempts",
            "web_connections",
            "web_processes",
            "result_ttl",
            "max_images_per_request",
            "job_result_ttl",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()} must be at least 1, not {getattr(self, name)!r}")
        # Zero would make a loop spin (a poll, a blocking claim, a heartbeat) or a key expire at once.
        positive = (
            "redis_socket_timeout",
            "block_timeout",
            "request_timeout",
            "poll_interval",
            "fallback_poll_after",
            "fallback_poll_max",
            "listener_ping_interval",
            "heartbeat_interval",
            "heartbeat_ttl",
            "max_batch_seconds",
            "client_read_timeout",
            "admission_wait_fraction",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.upper()} must be more than 0, not {getattr(self, name)!r}")
        for name in ("result_ttl", "job_result_ttl"):
            if getattr(self, name) > 5 * 10**6:  # the status of an async job is kept twice as long
                raise ValueError(f"{name.upper()} must be at most 5000000 seconds, not {getattr(self, name)!r}")
        if not self.recheck_margin < 1:
            raise ValueError(f"RECHECK_MARGIN must be below 1 (probabilities apart), not {self.recheck_margin!r}")
        if self.recheck_margin and self.precision != "bf16":
            raise ValueError("RECHECK_MARGIN is for PRECISION=bf16: f32 has no near ties to run again")
        redis_client.check_url(self.redis_url)
        if max(1, round(self.heartbeat_ttl)) <= self.heartbeat_interval:
            raise ValueError("HEARTBEAT_TTL must be longer than HEARTBEAT_INTERVAL, or live workers get swept")

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        """The defaults above, overridden by whichever environment variables are set."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(field.name.upper())
            if raw is not None:
                values[field.name] = _parse(field.name.upper(), field.type, raw)
        if "log_level" in values:
            values["log_level"] = values["log_level"].upper()
        return cls(**values)

    @classmethod
    def for_program(cls, program: str) -> "Settings":
        """`from_env()` for an entry point: a bad value ends it with "<program>: <what is wrong>" and exit status 1,
        no traceback (the message names the variable)."""
        try:
            return cls.from_env()
        except ValueError as exc:
            raise SystemExit(f"{program}: {exc}") from None

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


def _parse(name, kind, raw):
    if kind is bool:
        if raw not in ("0", "1"):
            raise ValueError(f"{name} must be 0 or 1, not {raw!r}")
        return raw == "1"
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {raw!r}") from None
