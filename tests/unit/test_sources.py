"""Opening a blend's sources: views per role, the checks refused up front, the data checksum, the eval sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import TINY
from trainrun.config import compose_config, validate_config
from trainrun.config.schema import DataConfig
from trainrun.data.layout import DatasetDirWriter
from trainrun.data.sources import open_sources
from trainrun.data.tokenizer import ByteTokenizer, train_bpe
from trainrun.distributed.initializers import init_single
from trainrun.errors import ConfigError, DataError
from trainrun.orchestrator import build_training_loop, resolve_vocab


def _dataset(directory: Path, docs: int, val_docs: int = 3, seed: int = 0, tokenizer=None) -> Path:
    rng = np.random.default_rng(seed)
    tokenizer = tokenizer or ByteTokenizer()
    directory.mkdir(parents=True)
    with DatasetDirWriter(directory, tokenizer, "byte" if isinstance(tokenizer, ByteTokenizer) else "bpe") as w:
        for split, count in (("train", docs), ("val", val_docs)):
            for _ in range(count):
                w.add(split, rng.integers(0, 250, size=int(rng.integers(5, 200))))
        w.finish(source="test")
    return directory


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sources")
    return _dataset(root / "web", 40), _dataset(root / "code", 30, seed=1)


def _cfg(**kw) -> DataConfig:
    return DataConfig(name="indexed", seq_len=16, **kw)


def test_a_blend_opens_each_source_with_its_own_splits(two) -> None:
    web, code = two
    data = open_sources(_cfg(blend=f"0.7 {web} 0.3 {code}"))
    assert [(v.source, v.weight, v.file_split, v.num_documents) for v in data.train] == [
        ("web", 0.7, "train", 40), ("code", 0.3, "train", 30)]
    assert [(v.source, v.file_split, v.num_documents) for v in data.valid] == [("web", "val", 3), ("code", "val", 3)]
    assert data.test == [] and data.vocab_size == 257
    per_source = data.source_checksums()
    assert sorted(per_source) == ["code", "web"]
    # what a resume under data.allow_blend_change compares per source: its data and the documents each role reads
    split = open_sources(_cfg(blend=f"0.7 {web} 0.3 {code}", split="90,5,5")).source_checksums()
    assert split["web"] != per_source["web"]
    reweighted = open_sources(_cfg(blend=f"0.5 {web} 0.1 {code}")).source_checksums()
    assert reweighted == per_source


def test_megatron_split_divides_each_sources_documents(two) -> None:
    web, code = two
    data = open_sources(_cfg(blend=f"0.7 {web} 0.3 {code}", split="80,10,10"))
    assert [(v.role, v.first_document, v.end_document) for v in (*data.train, *data.valid, *data.test)
            if v.source == "web"] == [("train", 0, 32), ("valid", 32, 36), ("test", 36, 40)]
    view = data.test[0]
    start, end = view.token_range()
    ds = view.dataset
    assert end - start == sum(int(ds.sizes[i]) for i in range(36, 40)) == len(view.tokens)
    assert np.array_equal(view.tokens[: ds.sizes[36]], ds[36])


def test_the_data_checksum_covers_every_source_and_the_split_but_not_the_weights(two) -> None:
    web, code = two
    plain = open_sources(_cfg(path=str(web)))
    assert plain.checksum == plain.datasets["indexed"].checksum  # as before blends: old checkpoints resume
    blend = open_sources(_cfg(blend=f"0.7 {web} 0.3 {code}"))
    reweighted = open_sources(_cfg(blend=f"0.5 {web} 0.5 {code}"))
    split = open_sources(_cfg(blend=f"0.7 {web} 0.3 {code}", split="90,5,5"))
    other_split = open_sources(_cfg(blend=f"0.7 {web} 0.3 {code}", split="80,10,10"))
    one = open_sources(_cfg(blend=f"1 {web}"))
    assert blend.checksum == reweighted.checksum  # a weight change is a blend change (data.allow_blend_change)
    assert len({plain.checksum, blend.checksum, split.checksum, other_split.checksum, one.checksum}) == 5


def test_sources_tokenized_differently_are_refused(two, tmp_path) -> None:
    web, _ = two
    bpe = train_bpe(["some text for a tokenizer " * 20], vocab_size=300)
    other = _dataset(tmp_path / "bpe", 5, tokenizer=bpe)
    with pytest.raises(DataError, match="tokenized differently.*same --tokenizer"):
        open_sources(_cfg(blend=f"0.5 {web} 0.5 {other}"))


def test_validating_on_trained_documents_is_refused(two) -> None:
    web, code = two
    with pytest.raises(ConfigError, match="trains on") as err:
        open_sources(_cfg(blend=f"1 {web}", valid_blend=[{"name": "v", "path": str(web), "split": "train"}]))
    assert err.value.field == "data.valid_blend"
    data = open_sources(_cfg(blend=f"1 {web}", valid_blend=[{"name": "held", "path": str(code), "split": "train"}],
                             test_blend=f"1 {code}"))
    assert [(v.source, v.file_split) for v in data.valid] == [("held", "train")]
    assert [(v.source, v.file_split) for v in data.test] == [("code", "val")]


def test_a_split_share_without_documents_is_refused(tmp_path) -> None:
    tiny = _dataset(tmp_path / "tiny", 3)
    with pytest.raises(ConfigError, match="without a document") as err:
        open_sources(_cfg(path=str(tiny), split="969,30,1"))
    assert err.value.field == "data.split"


def test_blend_entries_are_checked_before_anything_is_built(two, tmp_path) -> None:
    web, _ = two
    cfg = compose_config([f"data.blend=[{{name: a, path: '{web}'}}, {{name: b, path: '{tmp_path}/nope'}}]"])
    with pytest.raises(ConfigError, match="no such directory") as err:
        validate_config(cfg, world_size=1)
    assert err.value.field == "data.blend.1.path"


def _val_loss(tmp_path: Path, corpus: Path, micro_batch_size: int) -> tuple[float, list[float]]:
    cfg = compose_config([*TINY, f"data.path={corpus}", "train.global_batch_size=16",
                          f"train.micro_batch_size={micro_batch_size}", "checkpoint.resume=never",
                          "logging.console=false", "logging.jsonl=false", "eval.samples=37"])
    validate_config(cfg, world_size=1)
    data = open_sources(cfg.data)
    loop = build_training_loop(resolve_vocab(cfg, data), init_single(cfg), data, tmp_path / f"mb{micro_batch_size}")
    try:
        losses = [loop.train_step().loss.item() for _ in range(2)]
        return loop.components.evaluator.evaluate()["val_loss"], losses
    finally:
        loop.components.metrics.close()


def test_validation_reads_the_same_samples_for_every_micro_batch_size(tmp_path, corpus_cache) -> None:
    """The issue's example: the main job at 2 x 16 and 4 x 8 trained alike but validated on different data."""
    val16, train16 = _val_loss(tmp_path, corpus_cache, 16)
    val4, train4 = _val_loss(tmp_path, corpus_cache, 4)  # 37 samples: micro-batches of 4 end with a short one
    assert train4 == pytest.approx(train16, rel=1e-5)
    assert val4 == pytest.approx(val16, rel=1e-5)


def test_eval_size_is_samples_else_megatrons_global_batches_else_the_split() -> None:
    from trainrun.data.loader import AUTO_EVAL_SAMPLES, eval_sample_count

    assert eval_sample_count(37, 3, 16, 10_000) == 37  # eval.samples wins over a preset's eval.iters
    assert eval_sample_count(None, 3, 16, 10_000) == 48  # Megatron: eval_iters global batches
    assert eval_sample_count(None, None, 16, 100) == 100  # the whole (small) split
    assert eval_sample_count(None, None, 16, 10_000) == AUTO_EVAL_SAMPLES


def test_export_finds_a_blends_tokenizer_in_its_first_source(two) -> None:
    from trainrun.hf.tokenizer import find_tokenizer

    web, code = two
    found = find_tokenizer({"name": "stdlib", "blend": f"0.7 {web} 0.3 {code}"}, None, "checksum-of-the-blend")
    assert found.directory == web and found.kind == "byte"
    preset = find_tokenizer({"name": "stdlib", "blend": [{"name": "lib", "dataset": "stdlib", "subset": "library"}]},
                            None, None)
    assert preset.kind == "byte" and preset.directory is None
