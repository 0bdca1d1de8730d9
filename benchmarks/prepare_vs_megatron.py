"""trainrun-prepare vs Megatron-LM's ``tools/preprocess_data.py``: tokens/s on the same JSONL, the same Hugging Face
tokenizer and the same number of workers, and whether both wrote the same tokens.

Everything is made here, offline and deterministically: a JSONL corpus of plausible text (Zipf-distributed
words, sentences, paragraphs, some numbers and non-ASCII; documents of log-normal length) and a GPT-2-style
byte-level BPE trained on part of it with ``tokenizers``, saved as a ``transformers`` model directory
(``PreTrainedTokenizerFast.save_pretrained``) that both tools load. Megatron-LM is run from its own public
source tree (``--megatron-dir``; never copied into this project) with ``--python`` (an interpreter that has
its requirements: torch, numpy, transformers, packaging, triton) and ``--append-eod``; without
``--megatron-dir`` only trainrun runs.

    python benchmarks/prepare_vs_megatron.py --megatron-dir /tmp/megatron-lm --python /tmp/mvenv/bin/python

Each command is timed end to end (start-up and imports included, as a user waits for it), best of
``--repeats`` rounds; tokens/s counts the tokens each wrote, EOD included. CPU seconds (user + system
of the command and the processes it waited for; a fork server's workers are not among them) are
printed beside: on a shared machine they vary less than wall time. The rows:

* ``trainrun`` with ``--workers N``. With one worker trainrun tokenizes in its own process and the
  tokenizer's ``encode_batch`` uses its Rust threads (every core); with N > 1, N processes.
* ``trainrun, 1 thread`` (N = 1 only): the same with ``TOKENIZERS_PARALLELISM=false``, one core's worth
  of tokenizing, like Megatron's one worker process.
* ``megatron`` with ``--workers N``: N pool processes (``Pool.imap``, chunks of 32 lines, one
  ``tokenizer(text)`` call per document) and the parent that writes.

The token check: Megatron writes every document to one file, trainrun splits them into train and val by a
hash of each document's location; the benchmark recomputes that split (trainrun's own functions) and compares
Megatron's documents, in order, with trainrun's train and val documents. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainrun.data.indexed import IndexedDataset
from trainrun.data.prepare import find_sources
from trainrun.data.prepare_readers import document_keys
from trainrun.data.split import document_scores, validation_mask

EOD = "<|endoftext|>"
VAL_FRACTION = 0.01
SHIM = 'import typing\ntyping.override = getattr(typing, "override", lambda f: f)  # Python 3.12 API on 3.11\n'
"""sitecustomize for Megatron-LM on Python 3.11: current Megatron imports typing.override (3.12)."""


# ---------------------------------------------------------------- inputs, made here


def _vocabulary(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct word-like strings from English-ish syllables (a few with accents)."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "ch", "cr", "dr",
              "fl", "gr", "pl", "pr", "sh", "st", "th", "tr", "str"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "é", "ü"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "ss"]
    words: dict[str, None] = {}
    while len(words) < n:
        syllables = rng.choices([1, 2, 3, 4], weights=[30, 40, 22, 8])[0]
        words["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables))] = None
    return list(words)


def write_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """A JSONL corpus of about ``size_mb`` MB, the same bytes for the same arguments; returns its documents."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng, 30_000)
    cum = list(np.cumsum([1.0 / (rank + 2.7) ** 1.07 for rank in range(len(vocab))]))  # Zipf-like
    target, written, docs = int(size_mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            words = max(20, int(rng.lognormvariate(math.log(450), 0.9)))
            paragraphs, sentence = [], []
            paragraph: list[str] = []
            for w in rng.choices(vocab, cum_weights=cum, k=words):
                sentence.append(w)
                if rng.random() < 0.03:
                    sentence.append(str(rng.randint(0, 2025)))
                if len(sentence) > 6 and rng.random() < 0.08:
                    paragraph.append(" ".join(sentence).capitalize() + rng.choice([".", ".", ".", "?", "!", ";"]))
                    sentence = []
                    if rng.random() < 0.15:
                        paragraphs.append(" ".join(paragraph))
                        paragraph = []
            paragraph.append(" ".join(sentence).capitalize() + ".")
            paragraphs.append(" ".join(paragraph))
            line = json.dumps({"id": docs, "text": "\n\n".join(paragraphs)}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def train_tokenizer(corpus: Path, directory: Path, vocab_size: int, sample_mb: float = 8.0) -> None:
    """A GPT-2-style byte-level BPE trained on the first ``sample_mb`` MB, saved as a transformers directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        seen = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                seen += len(line)
                if seen > sample_mb * 1e6:
                    return
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD).save_pretrained(str(directory))


# ---------------------------------------------------------------- the two tools


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, of the command and every process it waited for)."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, _cpu_seconds() - cpu


def run_trainrun(corpus: Path, tokenizer: Path, out: Path, workers: int, threads: bool,
                 work: Path) -> tuple[float, float]:
    """Wall and CPU seconds ``trainrun-prepare`` takes; ``threads=False`` keeps the tokenizer to one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    if not threads:
        env["TOKENIZERS_PARALLELISM"] = "false"
    shutil.rmtree(out, ignore_errors=True)
    return _timed([sys.executable, "-m", "trainrun.data.prepare", str(corpus), "--output", str(out), "--tokenizer",
                   str(tokenizer), "--workers", str(workers), "--val-fraction", str(VAL_FRACTION)], env, work)


def run_megatron(python: str, megatron: Path, corpus: Path, tokenizer: Path, prefix: Path, workers: int,
                 work: Path) -> tuple[float, float]:
    """Wall and CPU seconds Megatron-LM's ``tools/preprocess_data.py`` takes (run from its own source tree)."""
    shim = work / "megatron_shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SHIM)
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    env.update(PYTHONPATH=f"{shim}{os.pathsep}{megatron}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}_text_document{suffix}").unlink(missing_ok=True)
    return _timed([python, str(megatron / "tools" / "preprocess_data.py"), "--input", str(corpus),
                   "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
                   "--tokenizer-model", str(tokenizer), "--workers", str(workers), "--append-eod",
                   "--log-interval", "1000000"], env, work)


def compare_tokens(corpus: Path, trainrun_out: Path, megatron_prefix: Path) -> dict:
    """Megatron's documents against trainrun's, with trainrun's train/val split recomputed."""
    is_val = validation_mask(document_scores(document_keys(find_sources([str(corpus)]), "text"), 0), VAL_FRACTION)
    meg = IndexedDataset(f"{megatron_prefix}_text_document")
    ours = {split: IndexedDataset(trainrun_out / split) for split in ("train", "val")}
    bounds = np.concatenate([[0], np.cumsum(meg.sizes.astype(np.int64))])
    result = {"documents": {"megatron": len(meg.sizes), "trainrun": len(ours["train"].sizes) + len(ours["val"].sizes)},
              "tokens": {"megatron": int(meg.num_tokens), "trainrun": int(sum(d.num_tokens for d in ours.values()))}}
    same = len(meg.sizes) == len(is_val)
    for split, mask in (("train", ~is_val), ("val", is_val)):
        if not same:
            break
        picked = np.flatnonzero(mask)
        sizes = meg.sizes[picked]
        same = np.array_equal(sizes, ours[split].sizes)
        if same:
            tokens = np.concatenate([meg.tokens[bounds[i]:bounds[i + 1]] for i in picked]) if len(picked) else []
            same = np.array_equal(np.asarray(tokens, dtype=np.int64), np.asarray(ours[split].tokens, dtype=np.int64))
    result["identical_token_streams"] = bool(same)
    return result


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megatron-dir", type=Path, help="Megatron-LM source tree (holding tools/preprocess_data.py)")
    p.add_argument("--python", default=sys.executable, help="interpreter to run Megatron-LM with")
    p.add_argument("--size-mb", type=float, default=64.0, help="size of the synthetic JSONL corpus")
    p.add_argument("--vocab-size", type=int, default=32_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the best is reported")
    p.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed after)")
    args = p.parse_args()
    if args.megatron_dir is not None and not (args.megatron_dir / "tools" / "preprocess_data.py").is_file():
        sys.exit(f"--megatron-dir {args.megatron_dir}: no tools/preprocess_data.py there; give Megatron-LM's source")
    work = Path(args.dir or tempfile.mkdtemp(prefix="prepare_vs_megatron."))
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = work / "corpus.jsonl", work / "tokenizer"
    start = time.perf_counter()
    documents = write_corpus(corpus, args.size_mb)
    train_tokenizer(corpus, tokenizer, args.vocab_size)
    print(f"corpus {corpus.stat().st_size / 1e6:.1f} MB, {documents} documents; tokenizer vocab {args.vocab_size} "
          f"({time.perf_counter() - start:.0f} s to make both); {os.cpu_count()} CPUs", flush=True)
    if args.megatron_dir is None:
        print("Megatron-LM skipped: pass --megatron-dir <its source tree> (and --python <an interpreter with its "
              "requirements>) to compare", flush=True)

    plan = [(name, workers, threads) for workers in args.workers
            for name, threads in [("trainrun", True), ("trainrun, 1 thread", False), ("megatron", None)]
            if (name != "trainrun, 1 thread" or workers == 1) and (name != "megatron" or args.megatron_dir)]
    best: dict[tuple[str, int], tuple[float, float]] = {}  # (wall, CPU) seconds of the fastest run
    # Rounds, not one row's repeats back to back: a burst of load on a shared machine then slows one
    # run of every row rather than every run of one row; the best of each row is kept.
    for round_ in range(args.repeats):
        for name, workers, threads in plan:
            out, prefix = work / f"trainrun_w{workers}", work / f"megatron_w{workers}"
            seconds, cpu = (run_trainrun(corpus, tokenizer, out, workers, threads, work) if name != "megatron" else
                            run_megatron(args.python, args.megatron_dir, corpus, tokenizer, prefix, workers, work))
            best[name, workers] = min((seconds, cpu), best.get((name, workers), (math.inf, math.inf)))
            print(f"  round {round_ + 1}: {name:20s} workers {workers}: {seconds:7.1f} s, CPU {cpu:6.1f} s", flush=True)

    rows, results = [], []
    for name, workers, _ in plan:
        if name == "megatron":
            tokens = IndexedDataset(work / f"megatron_w{workers}_text_document").num_tokens
        else:  # the 1-thread run wrote the same directory last: the same tokens
            tokens = sum(json.loads((work / f"trainrun_w{workers}" / "meta.json").read_text())["num_tokens"].values())
        rows.append((name, workers, *best[name, workers], int(tokens)))
    for workers in args.workers if args.megatron_dir is not None else []:
        check = compare_tokens(corpus, work / f"trainrun_w{workers}", work / f"megatron_w{workers}")
        ours = next(r for r in rows if r[0] == "trainrun" and r[1] == workers)
        theirs = next(r for r in rows if r[0] == "megatron" and r[1] == workers)
        results.append({"workers": workers, "trainrun_tokens_per_s": round(ours[4] / ours[2]),
                        "megatron_tokens_per_s": round(theirs[4] / theirs[2]),
                        "ratio": round(theirs[2] / ours[2], 3), "cpu_ratio": round(theirs[3] / ours[3], 3), **check})

    print("\n| tool | workers | seconds | tokens | tokens/s | CPU seconds | tokens per CPU-second |\n"
          "|---|---|---|---|---|---|---|")
    for name, workers, seconds, cpu, tokens in rows:
        print(f"| {name} | {workers} | {seconds:.1f} | {tokens:,} | {tokens / seconds:,.0f} | {cpu:.1f} | "
              f"{tokens / cpu:,.0f} |")
    for r in results:
        print(f"\nworkers {r['workers']}: tokens/s trainrun/megatron = **{r['ratio']:.2f}** (goal >= 1), "
              f"per CPU-second {r['cpu_ratio']:.2f}; documents {r['documents']}, tokens {r['tokens']}, "
              f"identical token streams: {r['identical_token_streams']}")
    print(json.dumps({"benchmark": "prepare_vs_megatron", "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
                      "documents": documents, "vocab_size": args.vocab_size, "cpus": os.cpu_count(),
                      "repeats": args.repeats, "results": results,
                      "rows": [{"tool": n, "workers": w, "seconds": round(s, 2), "cpu_seconds": round(c, 2),
                                "tokens": t, "tokens_per_s": round(t / s)} for n, w, s, c, t in rows],
                      "goal_met": bool(results) and all(r["ratio"] >= 1 for r in results)}))
    if args.dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
