"""The model facts the web process reads without TensorFlow: names and labels."""

import subprocess
import sys

import catalog
from support import ROOT


def test_labels_are_the_keras_imagenet_index():
    labels = catalog.load_labels()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[483] == "castle"
    # Four labels of the copy we started from had been translated; Keras's index names them in English.
    assert [labels[i] for i in (619, 765, 831, 846)] == ["lampshade", "rocking_chair", "studio_couch", "table_lamp"]
    assert all(label.replace("_", "").replace("-", "").replace("'", "").isalnum() for label in labels)


def test_the_web_app_imports_neither_tensorflow_nor_keras():
    # A fresh interpreter: this test process may have imported them for other tests.
    probe = "import sys, web; print(sorted(m for m in ('tensorflow', 'keras', 'models') if m in sys.modules))"
    printed = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == "[]"
