"""Start a model worker: `python run_model_server.py`, configured by the environment (see settings.py)."""

import numpy as np

import jobs
import logger
import models
import redis_client
from logger import log
from settings import Settings
from worker import Worker


def main():
    config = Settings.from_env()
    logger.configure(config)
    log(
        "worker_starting",
        model=config.model,
        weights=config.model_weights or "default",
        redis=redis_client.describe(config.redis_url),
    )
    classifier = models.load(config)
    # Warm up before taking jobs: TensorFlow traces the model once for batch 1 and once more for a general
    # batch size, and both runtimes pay extra on the first call of a batch shape; left to the first real
    # batches, that costs a second or two each.
    for size in sorted({1, 2, config.batch_size}):
        classifier.predict(np.zeros((size, *jobs.IMAGE_SHAPE), dtype=np.uint8))
    log(
        "model_loaded",
        model=classifier.name,
        weights=classifier.weights,
        runtime=classifier.runtime,
        precision=classifier.precision,
    )
    Worker(classifier, config).run()


if __name__ == "__main__":
    main()
