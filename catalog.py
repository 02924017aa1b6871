"""What the service's models are, without loading one: their names and their ImageNet labels.

The web process answers questions about the models (the Open Inference Protocol's metadata, the labels of a
classification) and must not import TensorFlow to do it, so these facts live apart from models.py.
"""

import json
from pathlib import Path

LABELS_FILE = Path(__file__).resolve().parent / "imagenet_class_index.json"
MODELS = ("resnet50", "efficientnet_lite0")


def load_labels(path=LABELS_FILE):
    """Keras's ImageNet index ({"0": ["n01440764", "tench"], ...}) as a list of 1000 labels."""
    index = json.loads(Path(path).read_text())
    return [index[str(i)][1] for i in range(len(index))]
