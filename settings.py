"""Every knob of the service, read once from the environment. Nothing else reads os.environ for config."""
import os


def _str(name, default):
    return os.environ.get(name, default)


def _int(name, default):
    return int(os.environ.get(name, default))


def _float(name, default):
    return float(os.environ.get(name, default))


# Redis: a password or TLS goes in the URL (redis://:pass@host:6379/0, rediss://...).
REDIS_URL = _str("REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_SOCKET_TIMEOUT = _float("REDIS_SOCKET_TIMEOUT", 5)
# How long a worker blocks waiting for the first job of a batch; kept below the socket timeout.
BLOCK_TIMEOUT = _float("BLOCK_TIMEOUT", 4)

# Web server
HOST = _str("HOST", "127.0.0.1")
PORT = _int("PORT", 5000)
WEB_PROCESSES = _int("WEB_PROCESSES", 1)
WEB_THREADS = _int("WEB_THREADS", 96)
WEB_REDIS_CONNECTIONS = _int("WEB_REDIS_CONNECTIONS", 16)
# Niceness of the web processes: on a machine shared with a worker, the model's threads go first.
WEB_NICE = _int("WEB_NICE", 10)
REQUEST_TIMEOUT = _float("REQUEST_TIMEOUT", 30)
MAX_UPLOAD_BYTES = _int("MAX_UPLOAD_BYTES", 10 * 1024 * 1024)
MAX_IMAGE_PIXELS = _int("MAX_IMAGE_PIXELS", 40_000_000)
MAX_QUEUE_LENGTH = _int("MAX_QUEUE_LENGTH", 500)
# "notify": pub/sub wake-ups with polling only as a fallback; "poll": plain polling (for comparison).
WAIT_MODE = _str("WAIT_MODE", "notify")
POLL_INTERVAL = _float("POLL_INTERVAL", 0.25)
FALLBACK_POLL_AFTER = _float("FALLBACK_POLL_AFTER", 5.0)
FALLBACK_POLL_MAX = _float("FALLBACK_POLL_MAX", 10.0)

# Queue protocol
IMAGE_QUEUE = _str("IMAGE_QUEUE", "image_queue")
RESULT_TTL = _int("RESULT_TTL", 60)
MAX_ATTEMPTS = _int("MAX_ATTEMPTS", 3)
HEARTBEAT_INTERVAL = _float("HEARTBEAT_INTERVAL", 5)
HEARTBEAT_TTL = _float("HEARTBEAT_TTL", 15)

# Model worker
MODEL = _str("MODEL", "auto")
# Empty: Keras's ImageNet download (or its cache); a path: an .h5 file; "none": random weights.
MODEL_WEIGHTS = _str("MODEL_WEIGHTS", "")
MODEL_CACHE_DIR = _str("MODEL_CACHE_DIR", os.path.expanduser("~/.cache/image-classifier"))
BATCH_SIZE = _int("BATCH_SIZE", 32)
TF_INTRA_OP_THREADS = _int("TF_INTRA_OP_THREADS", 0)
TF_INTER_OP_THREADS = _int("TF_INTER_OP_THREADS", 0)

# Logging
SERVER_NAME = _str("SERVER_NAME", "")
LOG_LEVEL = _str("LOG_LEVEL", "INFO").upper()
LOG_FORMAT = _str("LOG_FORMAT", "text")
LOG_TO_REDIS = _str("LOG_TO_REDIS", "0") == "1"
LOG_STREAM_MAXLEN = _int("LOG_STREAM_MAXLEN", 100_000)
