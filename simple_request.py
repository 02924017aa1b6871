"""Send an image to the service and print its top predictions: python simple_request.py [IMAGE]."""

import argparse
import sys

import requests

from settings import Settings


def main(argv=None):
    config = Settings.for_program("simple_request")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image", nargs="?", default="castle_image.jpg")
    parser.add_argument("--url", default=f"http://{config.host}:{config.port}/predict")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        with open(args.image, "rb") as f:
            response = requests.post(
                args.url, files={"image": f}, params={"top_k": args.top_k}, timeout=config.request_timeout + 10
            )
    except OSError as exc:
        if isinstance(exc, requests.ConnectionError):
            print(f"error: cannot reach the service at {args.url}; is `make run` running?", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        body = response.json()
    except ValueError:
        body = {"success": False, "error": response.text[:200]}
    if response.status_code != 200 or not body.get("success"):
        print(f"error: the service answered {response.status_code}: {body.get('error')}", file=sys.stderr)
        return 1
    for i, prediction in enumerate(body["predictions"], 1):
        print(f"{i}. {prediction['label']}: {prediction['probability']:.4f}")
    print(f"(model {body['model']}, job {body['id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
