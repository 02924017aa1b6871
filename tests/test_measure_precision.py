"""measure_precision.py's counting: what the README's bf16 numbers are made of."""

import numpy as np

import measure_precision


def test_counts_top1_top5_and_confidence_row_by_row():
    reference = np.array(
        [
            [0.90, 0.05, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005],  # sure, unchanged
            [0.12, 0.13, 0.16, 0.15, 0.11, 0.12, 0.10, 0.11],  # a near tie (0.16 against 0.15) that flips
            [0.07, 0.00, 0.02, 0.04, 0.60, 0.10, 0.09, 0.08],  # top-1 stays; class 1 takes class 0's place in the top 5
            [0.01, 0.02, 0.03, 0.04, 0.05, 0.05, 0.50, 0.30],  # sure, and moved
        ],
        np.float32,
    )
    candidate = reference.copy()
    candidate[1, [2, 3]] = [0.15, 0.16]
    candidate[2, [0, 1]] = [0.00, 0.07]
    candidate[3, [6, 7]] = [0.30, 0.50]
    names = ["steady", "tie", "fifth", "moved"]

    r = measure_precision.compare(reference, candidate, names)

    assert (r["photos"], r["top1_same"], r["top5_same_set"]) == (4, 2, 3)  # only "fifth" changed its set
    assert (r["confident"], r["confident_top1_same"]) == (3, 2)  # steady, fifth and moved are >= 0.2
    assert r["top1_moved"] == {"tie": np.float32(0.16), "moved": np.float32(0.5)}
    assert r["largest_change_photo"] == "moved" and abs(r["largest_change"] - 0.2) < 1e-6


def test_identical_answers_agree_everywhere():
    reference = np.array(
        [[0.9, 0.02, 0.02, 0.02, 0.01, 0.01, 0.01, 0.01], [0.1, 0.1, 0.3, 0.4, 0.05, 0.03, 0.01, 0.01]]
    )
    r = measure_precision.compare(reference, reference.copy(), ["a", "b"])
    assert (r["top1_same"], r["top5_same_set"], r["confident_top1_same"], r["largest_change"]) == (2, 2, 2, 0.0)
    assert r["top1_moved"] == {}


def test_a_folder_adds_its_images_and_what_is_not_one_is_left_out(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "jemma.png").write_bytes((measure_precision.ROOT / "jemma.png").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")

    files = measure_precision.photos(tmp_path)
    pixels = measure_precision.prepared(files)

    folder = tmp_path.name
    assert {"castle", "jemma", "chelsea", f"{folder}/sub/jemma.png", f"{folder}/notes.txt"} <= set(files)
    assert len(files) == 2 + len(measure_precision.SCIKIT_IMAGE_PHOTOS) + 2
    assert f"{folder}/notes.txt" not in pixels and pixels[f"{folder}/sub/jemma.png"].shape == (224, 224, 3)
    assert f"left out {folder}/notes.txt" in capsys.readouterr().out
