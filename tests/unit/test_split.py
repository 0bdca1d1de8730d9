"""The train/validation split keeps a stored document in each split, also when some documents are empty.

Empty documents are never written, so a split whose only documents are empty is an empty split. The
split depends on location keys (paths), so the tests pick which document is empty from the scores
the run will compute, instead of hoping a fixed one lands where the fault shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainrun.data.datasets import open_dataset_dir
from trainrun.data.prepare import find_sources, prepare
from trainrun.data.prepare import main as prepare_main
from trainrun.data.prepare_readers import document_keys
from trainrun.data.split import document_scores, validation_mask


def test_the_mask_without_text_flags_moves_the_extremes() -> None:
    scores = np.array([0.5, 0.3, 0.9, 0.7])
    assert validation_mask(scores, 0.1).tolist() == [False, True, False, False]  # none below: lowest moved
    assert validation_mask(scores, 0.95).tolist() == [True, True, False, True]  # all below: highest moved
    assert validation_mask(scores, 0.6).tolist() == [True, True, False, False]  # both splits hold some: as scored


@pytest.mark.parametrize(("val_fraction", "expected"), [
    (0.1, [True, False, False, False]),  # the lowest (0.3) is empty: the lowest with text (0.5) is moved
    (0.4, [True, True, False, False]),  # the only one scored below (0.3) is empty: a split of nothing stored
    (0.95, [True, True, True, False]),  # the highest (0.9) is empty: the highest with text (0.7) stays train
])
def test_only_documents_with_text_count(val_fraction: float, expected: list[bool]) -> None:
    scores = np.array([0.5, 0.3, 0.9, 0.7])
    has_text = np.array([True, False, False, True])
    mask = validation_mask(scores, val_fraction, has_text)
    assert mask.tolist() == expected
    assert (mask & has_text).any() and (~mask & has_text).any()


def test_fewer_than_two_documents_with_text_are_left_as_scored() -> None:
    scores = np.array([0.5, 0.3])
    assert validation_mask(scores, 0.1, np.array([True, False])).tolist() == [False, False]


def _jsonl_with_an_empty_document(tmp_path: Path, n: int, pick: str, val_fraction: float) -> tuple[Path, int]:
    """A .jsonl of ``n`` documents where the one the split would move (``pick``: lowest or highest score) is
    empty; returns the file and the index of the document with text that must take its place."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} with text"}) + "\n" for i in range(n)))
    scores = document_scores(document_keys(find_sources([str(path)]), "text"))
    order = np.argsort(scores) if pick == "lowest" else np.argsort(-scores)
    empty, replacement = int(order[0]), int(order[1])
    lines = path.read_text().splitlines()
    lines[empty] = json.dumps({"text": ""})
    path.write_text("\n".join(lines) + "\n")
    return path, replacement


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
@pytest.mark.parametrize(("pick", "val_fraction"), [("lowest", 1e-9), ("highest", 1 - 1e-9)])
def test_prepare_moves_a_document_with_text_when_the_moved_one_is_empty(tmp_path: Path, tokenizer: str, pick: str,
                                                                        val_fraction: float) -> None:
    # The CI failure this comes from: 40 documents, --val-fraction 0.02, none scored below it, and the
    # lowest-scoring one (moved to validation) was the empty one: "a split came out empty".
    path, replacement = _jsonl_with_an_empty_document(tmp_path, 12, pick, val_fraction)
    meta = prepare([str(path)], str(tmp_path / "out"), tokenizer=tokenizer, vocab_size=300, val_fraction=val_fraction)
    small_split = "val" if pick == "lowest" else "train"
    assert meta["num_documents"][small_split] == 1
    assert meta["num_documents"]["train"] + meta["num_documents"]["val"] == 11  # the empty one is not stored
    ds = open_dataset_dir(tmp_path / "out", verify_checksum=True)
    split = ds.val if pick == "lowest" else ds.train
    tokens = split[0].tolist()
    assert ds.tokenizer.decode(tokens[:-1]) == f"document {replacement} with text"


def test_prepare_needs_two_documents_with_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": ""}\n{"text": "the only text"}\n{"text": ""}\n')
    assert prepare_main([str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("trainrun-prepare: error: only 1 of 3 documents holds text, and a train and a validation "
                   "split need at least 2; add inputs that hold text")
    assert not (tmp_path / "out").exists()
