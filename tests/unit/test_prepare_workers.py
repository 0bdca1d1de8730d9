"""``trainrun-prepare --workers N`` (trainrun.data.prepare_encode): N processes write the same bytes as one,
a bad record met by a worker is reported as with one, and the progress bar counts documents and tokens."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tqdm import tqdm

from trainrun.data.prepare import main as prepare_main
from trainrun.data.prepare import prepare
from trainrun.data.prepare_encode import ENCODE_CHUNK
from trainrun.data.tokenizer import train_bpe

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "ünïcode", "✓", "data"]
FILES = ("train.bin", "train.idx", "val.bin", "val.idx", "meta.json")


def _corpus(tmp_path: Path, n: int = 3 * ENCODE_CHUNK + 17) -> Path:
    """Several chunks of documents of uneven length (some empty), so chunks finish out of order."""
    rng = random.Random(0)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 300)))})
                            + "\n" for _ in range(n)))
    return path


def _hf_tokenizer(tmp_path: Path, corpus: Path) -> Path:
    """A local tokenizer.json (as a Hugging Face model directory would hold), trained on the corpus."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    train_bpe(texts, 320).save(path)
    return path


@pytest.mark.parametrize("tokenizer", ["byte", "bpe", "hf"])
def test_three_workers_write_the_bytes_of_one(tmp_path: Path, tokenizer: str) -> None:
    corpus = _corpus(tmp_path)
    tok = str(_hf_tokenizer(tmp_path, corpus)) if tokenizer == "hf" else tokenizer
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        assert prepare_main([str(corpus), "--output", str(out), "--tokenizer", tok, "--vocab-size", "300",
                             "--val-fraction", "0.1", "--workers", str(workers)]) == 0
        outputs[workers] = {name: (out / name).read_bytes() for name in FILES}
    assert outputs[1] == outputs[3]
    meta = json.loads(outputs[3]["meta.json"])
    assert meta["num_documents"]["val"] > 0 and sum(meta["num_tokens"].values()) > 0


def test_the_first_bad_record_is_reported_whichever_worker_met_it(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    corpus = _corpus(tmp_path)
    lines = corpus.read_text().splitlines(keepends=True)
    first, later = ENCODE_CHUNK + 40, 2 * ENCODE_CHUNK + 3  # in different chunks, neither the first
    lines[first - 1] = '{"text": 42}\n'
    lines[later - 1] = '{"text": "unterminated\n'
    corpus.write_text("".join(lines))
    for workers in ("1", "2"):
        rc = prepare_main([str(corpus), "--output", str(tmp_path / "out"), "--workers", workers])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"{corpus}:{first}: field 'text' is a JSON number, not a string" in err
        assert not (tmp_path / "out").exists()


def test_workers_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert prepare_main([str(_corpus(tmp_path, 10)), "--output", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err


def test_the_progress_bar_shows_documents_tokens_and_rate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = _corpus(tmp_path, 300)
    meta = prepare([str(corpus)], str(tmp_path / "out"), progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert bar.startswith("tokenizing: 100%") and "300/300" in bar, bar  # every line, empty texts included
    tokens = sum(meta["num_tokens"].values())  # EOD included, as stored
    assert f"{tqdm.format_sizeof(tokens)} tokens, " in bar and "tokens/s]" in bar, bar


def test_no_progress_bar_off_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prepare([str(_corpus(tmp_path, 20))], str(tmp_path / "out"))  # stderr is captured here: not a terminal
    assert capsys.readouterr().err == ""


def test_workers_from_the_fork_server_write_the_same_bytes(tmp_path: Path) -> None:
    """Parquet input: Arrow's threads run in the parent, so the workers come from the fork server instead."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [json.loads(line)["text"] for line in _corpus(tmp_path).read_text().splitlines()]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100)
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        assert prepare_main([str(path), "--output", str(out), "--val-fraction", "0.1", "--workers", workers]) == 0
        outputs.append({name: (out / name).read_bytes() for name in FILES})
    assert outputs[0] == outputs[1]
