"""Hugging Face export and import under real 2-process layouts (gloo, CPU), against one process.

Each layout starts from the same transformers model (``model.init_from``: every rank reads only its
own shards), trains 2 steps and saves; its checkpoint is then exported in this one CPU process and
loaded with transformers. GPT-2 runs under FSDP (its transposed, fused ``c_attn`` is sliced per
shard), Llama under TP (row- and column-sharded projections, an unevenly sharded 257-row output).

* Import: the first step's loss equals the one-process run's (the same weights reached every shard).
* Export: the exported model's logits equal trainrun's forward of that checkpoint read in one
  process (``LOGIT_ATOL``), and the one-process run's model within ``LAYOUT_ATOL`` (2 steps trained
  in another layout differ in the last bits, see test_parallel.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # read by transformers when first imported: no network anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from tests.distributed.test_parallel import single, torchrun  # noqa: E402
from tests.helpers.cli import train_losses  # noqa: E402
from tests.unit.test_hf_export import load_trainrun_model  # noqa: E402
from trainrun.hf.export import main as export_main  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LOGIT_ATOL = 1e-5
LAYOUT_ATOL = 1e-4
LOSS_RTOL = 1e-5
RUN = ["data.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=8", "data.max_documents=50",
       "train.max_steps=2", "train.log_interval=1", "train.progress_bar=false", "eval.interval=0", "eval.iters=1",
       "eval.sample_tokens=0", "checkpoint.interval=0", "optim.warmup_steps=1"]


def _randomise_and_save(model: torch.nn.Module, directory: Path) -> Path:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """A random Llama and a random GPT-2 (exact GELU), built from configs and saved locally."""
    root = tmp_path_factory.mktemp("hf")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=256,
        eos_token_id=256))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=64, activation_function="gelu",
        bos_token_id=256, eos_token_id=256))
    return {"llama": _randomise_and_save(llama, root / "llama"), "gpt2": _randomise_and_save(gpt2, root / "gpt2")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return f"data.path={tmp_path_factory.mktemp('corpus')}"


def _latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize(("arch", "layout"), [("gpt2", "parallel.dp_shard=2"), ("llama", "parallel.tp=2")])
def test_parallel_init_from_and_export(arch, layout, hf_models, corpus, tmp_path):
    args = [*RUN, corpus, f"model.init_from={hf_models[arch]}"]
    reference = single(tmp_path / "single", args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    parallel = torchrun(2, tmp_path / "parallel", [*args, layout])
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    # Import: the same weights reached every shard, so the first loss (before any update) is the same. (A
    # shard left at trainrun's random init would differ: the one-process import is checked in the unit tests.)
    assert train_losses(tmp_path / "parallel")[1] == pytest.approx(train_losses(tmp_path / "single")[1],
                                                                   rel=LOSS_RTOL)

    out = tmp_path / "exported"
    assert export_main([str(tmp_path / "parallel"), "--output", str(out)]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    same_checkpoint, _ = load_trainrun_model(_latest(tmp_path / "parallel"))
    one_process, _ = load_trainrun_model(_latest(tmp_path / "single"))
    torch.manual_seed(0)
    ids = torch.randint(0, 257, (2, 16))
    theirs = _logits(hf_model, ids)
    diff = float((theirs - _logits(same_checkpoint, ids)).abs().max())
    layout_diff = float((theirs - _logits(one_process, ids)).abs().max())
    print(f"{arch} {layout}: max |logit diff| vs its checkpoint {diff:.3g}, vs the one-process run {layout_diff:.3g}")
    assert diff < LOGIT_ATOL
    assert layout_diff < LAYOUT_ATOL
