"""Start a model worker: `python run_model_server.py`, configured by the environment (see settings.py)."""

import logger
import models
import redis_client
from logger import log
from settings import Settings
from worker import Worker


def main():
    config = Settings.for_program("run_model_server")
    logger.configure(config)
    log(
        "worker_starting",
        model=config.model,
        weights=config.model_weights or "default",
        redis=redis_client.describe(config.redis_url),
    )
    classifier = models.load(config)
    classifier.warm_up(config.batch_size)
    log(
        "model_loaded",
        model=classifier.name,
        weights=classifier.weights,
        runtime=classifier.runtime,
        precision=classifier.precision,
        slice=classifier.slice if 0 < classifier.slice < config.batch_size else "whole batch",
    )
    Worker(classifier, config).run()


if __name__ == "__main__":
    main()
