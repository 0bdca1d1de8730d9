"""Nothing a user does loses work: the output-directory rule of trainrun-export, -prepare and -report.

One class of fault per section: an output that is (or holds, or lies in) an input, a run or a
checkpoint directory; ``--force`` over a directory the command did not write; a replacement that
fails midway; and the one-line messages for inputs and outputs a user can get wrong. Each test
builds the real thing (a run directory with a DCP checkpoint, a prepared dataset) and checks,
file by file, that a refused command left it as it was.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest

from trainrun.data.fsutil import publish_dir
from trainrun.data.prepare import main as prepare_main
from trainrun.launch.report import main as report_main
from trainrun.outputs import OutputError, check_output_dir, marker_name, staged_output

pytest.importorskip("safetensors")


# ---- helpers ------------------------------------------------------------------------------------------

def make_run(run_dir: Path, steps: tuple[int, ...] = (1,)) -> Path:
    """A run directory as training leaves it: .hydra/, metrics.jsonl, status, and real DCP checkpoints."""
    import torch  # noqa: F401 - the checkpoint store needs it; kept out of the module for collection speed
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from trainrun.checkpoint.store import CheckpointStore
    from trainrun.config.schema import ModelConfig
    from trainrun.model import GPT

    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("train:\n  max_steps: 2\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- optim.lr=0.001\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in steps))
    (run_dir / "trainrun_status.json").write_text(json.dumps({"status": "finished", "requeues": 0}))
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=4, max_seq_len=32, vocab_size=257)
    model = GPT(cfg)
    meta = {"model": dataclasses.asdict(cfg), "config": {"model": dataclasses.asdict(cfg), "data": {"name": "stdlib"}}}
    store = CheckpointStore(run_dir / "checkpoints", 0, True, lambda: None)
    for step in steps:
        store.save(step, {"model": get_model_state_dict(model)}, {**meta, "step": step})
    return run_dir


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), to compare before and after a command."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[Path]:
    """Temporary directories a command left behind (staging ``.x.tmp-*`` or swapped-out ``.x.old-*``)."""
    return [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def refused(capsys: pytest.CaptureFixture, main, argv: list[str], *needles: str) -> str:
    """Run a CLI's ``main`` expecting exit 2 and one line on stderr holding every needle; returns the line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def export_main(argv: list[str]) -> int:
    from trainrun.hf.export import main

    return main(argv)


def write_texts(directory: Path, n: int = 4) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"doc{i}.txt").write_text(f"document number {i}\n" * 8)
    return directory


# ---- class 1: an output that is, holds or lies in the command's input ------------------------------------

@pytest.mark.parametrize("where", ["run_dir", "above_run", "inside_run", "checkpoint_dir", "step_dir",
                                   "symlink_to_run", "inside_checkpoints"])
@pytest.mark.parametrize("force", [False, True])
def test_export_never_writes_over_or_into_its_input(tmp_path, capsys, where, force):
    run = make_run(tmp_path / "runs" / "r1", steps=(1, 2))
    (tmp_path / "runs" / "notes.txt").write_text("unrelated, beside the run")
    (tmp_path / "link").symlink_to(run)
    output = {"run_dir": run, "above_run": tmp_path / "runs", "inside_run": run / "hf",
              "checkpoint_dir": run / "checkpoints", "step_dir": run / "checkpoints" / "step_2",
              "symlink_to_run": tmp_path / "link", "inside_checkpoints": run / "checkpoints" / "hf"}[where]
    before = snapshot(tmp_path / "runs")
    for source in (run, run / "checkpoints", run / "checkpoints" / "step_2"):
        refused(capsys, export_main, [source, "--output", output, "--no-tokenizer", *(["--force"] if force else [])],
                f"--output {output}", "choose")
    assert snapshot(tmp_path / "runs") == before
    assert not leftovers(tmp_path) and not (run / "hf").exists()


def test_export_output_in_or_over_the_dataset_it_reads_is_refused(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    run = make_run(tmp_path / "run")
    dataset = tmp_path / "ds"
    assert prepare_main([str(write_texts(tmp_path / "texts")), "--output", str(dataset), "--val-fraction", "0.3"]) == 0
    before = snapshot(dataset)
    for output in (dataset, dataset / "hf", tmp_path / "texts" / ".."):
        refused(capsys, export_main, [run, "--output", output, "--data", dataset, "--force"], "the input")
    assert snapshot(dataset) == before
    assert export_main([str(run), "--output", str(tmp_path / "hf"), "--data", str(dataset)]) == 0


def test_prepare_never_replaces_its_tokenizer_directory(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["document number one two"] * 20, trainer)
    tok.save(str(tok_dir / "tokenizer.json"))
    before = snapshot(tok_dir)
    refused(capsys, prepare_main, [write_texts(tmp_path / "texts"), "--output", tok_dir, "--tokenizer", tok_dir,
                                   "--force"], f"--output {tok_dir} is the input {tok_dir}")
    assert snapshot(tok_dir) == before


# ---- class 1: an output that is or holds someone's work (not this command's earlier output) ------------

@pytest.mark.parametrize("command", ["export", "prepare"])
@pytest.mark.parametrize("target", ["other_run", "other_checkpoints", "inside_other_checkpoints", "user_dir",
                                    "other_commands_output", "file"])
def test_force_never_replaces_what_the_command_did_not_write(tmp_path, capsys, command, target):
    run = make_run(tmp_path / "run")
    other = make_run(tmp_path / "other")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("keep")
    foreign = tmp_path / ("hf" if command == "prepare" else "ds")  # the *other* command's output
    if command == "prepare":
        assert export_main([str(run), "--output", str(foreign), "--no-tokenizer"]) == 0
    else:
        assert prepare_main([str(write_texts(tmp_path / "t0")), "--output", str(foreign), "--val-fraction", "0.3"]) == 0
    output = {"other_run": other, "other_checkpoints": other / "checkpoints",
              "inside_other_checkpoints": other / "checkpoints" / "new", "user_dir": tmp_path / "mine",
              "other_commands_output": foreign, "file": tmp_path / "notes.txt"}[target]
    argv = ([run, "--no-tokenizer"] if command == "export" else [write_texts(tmp_path / "texts")])
    main = export_main if command == "export" else prepare_main
    before = snapshot(tmp_path)
    err = refused(capsys, main, [*argv, "--output", output, "--force"], f"--output {output}")
    assert "pass --force" not in err  # --force would not help: no hint that it would
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


def test_force_replaces_an_earlier_export_safely(tmp_path, capsys):
    run = make_run(tmp_path / "run", steps=(1, 2))
    out = tmp_path / "hf"
    assert export_main([str(run), "--output", str(out), "--no-tokenizer", "--step", "1"]) == 0
    marker = json.loads((out / marker_name("trainrun-export")).read_text())
    assert marker["command"] == "trainrun-export" and marker["checkpoint"].endswith("step_1")
    refused(capsys, export_main, [run, "--output", out, "--no-tokenizer"], "already holds a trainrun-export output",
            "pass --force")
    assert export_main([str(run), "--output", str(out), "--no-tokenizer", "--force"]) == 0
    assert json.loads((out / marker_name("trainrun-export")).read_text())["checkpoint"].endswith("step_2")
    assert not leftovers(tmp_path)
    # Work put inside an earlier export is not deleted with it.
    make_run(out / "moved_here")
    refused(capsys, export_main, [run, "--output", out, "--no-tokenizer", "--force"], "holds the run directory")
    assert (out / "moved_here" / "checkpoints" / "step_1" / "trainrun.json").is_file()


def test_force_replaces_an_earlier_prepare_output_even_unmarked(tmp_path, capsys):
    texts = write_texts(tmp_path / "texts")
    out = tmp_path / "ds"
    args = [str(texts), "--output", str(out), "--val-fraction", "0.3"]
    assert prepare_main(args) == 0
    refused(capsys, prepare_main, args, "already holds a trainrun-prepare output", "pass --force")
    (out / marker_name("trainrun-prepare")).unlink()  # as written before outputs were marked: meta.json tells
    assert prepare_main([*args, "--force"]) == 0
    assert (out / marker_name("trainrun-prepare")).is_file() and not leftovers(tmp_path)


def test_ctrl_c_during_a_forced_prepare_keeps_the_earlier_output(tmp_path, capsys, monkeypatch):
    texts = write_texts(tmp_path / "texts")
    out = tmp_path / "ds"
    args = [str(texts), "--output", str(out), "--val-fraction", "0.3"]
    assert prepare_main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("trainrun.data.prepare_encode.ChunkEncoder.__call__", interrupted)  # mid-tokenizing
    assert prepare_main([*args, "--force"]) == 130
    assert "interrupted (Ctrl-C); --output was left as it was" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not leftovers(tmp_path)


def test_prepare_skips_earlier_trainrun_outputs_inside_its_inputs(tmp_path, caplog):
    texts = write_texts(tmp_path / "texts")
    run = make_run(tmp_path / "run")
    assert prepare_main([str(texts), "--output", str(texts / "ds"), "--val-fraction", "0.3"]) == 0
    assert export_main([str(run), "--output", str(texts / "hf"), "--no-tokenizer"]) == 0
    caplog.clear()
    assert prepare_main([str(texts), "--output", str(tmp_path / "ds2"), "--val-fraction", "0.3"]) == 0
    meta = json.loads((tmp_path / "ds2" / "meta.json").read_text())
    assert sum(meta["num_documents"].values()) == 4  # neither train.bin nor model.safetensors became a document
    assert {r.getMessage().split(":")[0] for r in caplog.records if "skipping" in r.getMessage()} == \
        {f"skipping {texts / 'ds'}", f"skipping {texts / 'hf'}"}


# ---- class 1: a replacement that fails midway keeps the earlier output ---------------------------------------

def test_failed_export_keeps_the_earlier_one(tmp_path, capsys, monkeypatch):
    import trainrun.hf.export as export_module
    from trainrun.hf.mapping import ExportError

    run = make_run(tmp_path / "run")
    out = tmp_path / "hf"
    assert export_main([str(run), "--output", str(out), "--no-tokenizer"]) == 0
    before = snapshot(out)

    def fail_midway(step_dir, cfg, output, dtype, max_bytes):
        (output / "model.safetensors").write_bytes(b"half")
        raise ExportError("simulated failure while writing")

    monkeypatch.setattr(export_module, "write_weights", fail_midway)
    refused(capsys, export_main, [run, "--output", out, "--no-tokenizer", "--force"], "simulated failure")
    assert snapshot(out) == before and not leftovers(tmp_path)


def test_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    final, tmp = tmp_path / "out", tmp_path / ".out.tmp-x"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if Path(src) == tmp and Path(dst) == final and len(calls) > 1:
            raise OSError(errno.EIO, "simulated I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        publish_dir(tmp, final, replace=True)
    assert (final / "old.txt").read_text() == "old"
    assert leftovers(tmp_path) == [tmp]  # the new one stays for its staging_dir to remove; no swapped-out copy


def test_write_error_is_one_line_naming_the_option(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError) as caught, staged_output(out, "trainrun-export") as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    message = str(caught.value)
    assert message.startswith(f"--output {out} could not be written (No space left on device)") and "\n" not in message
    assert not out.exists() and not leftovers(tmp_path)


# ---- class 2: unwritable outputs are one line naming --output ----------------------------------------------

@pytest.mark.parametrize("command", ["export", "prepare"])
def test_unwritable_output_is_one_line_naming_the_option(tmp_path, capsys, monkeypatch, command):
    run = make_run(tmp_path / "run")
    argv = [run, "--no-tokenizer"] if command == "export" else [write_texts(tmp_path / "texts")]
    main = export_main if command == "export" else prepare_main
    locked = tmp_path / "locked"
    locked.mkdir()
    real_open = os.open

    def deny_probe(path, *args, **kwargs):  # what a read-only directory does (root ignores chmod, so simulated)
        if ".trainrun-probe" in str(path) and Path(path).parent == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny_probe)
    refused(capsys, main, [*argv, "--output", locked / "out"], "--output is not writable (Permission denied)",
            "set --output to a directory you can write to")
    (tmp_path / "afile").write_text("x")
    refused(capsys, main, [*argv, "--output", tmp_path / "afile" / "out"], "which is a file")
    assert not leftovers(tmp_path) and not (locked / "out").exists()


def test_check_output_dir_allows_a_new_or_empty_directory(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper", "trainrun-export", inputs=[tmp_path / "in"])
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "trainrun-export")
    assert not (tmp_path / "new").exists()  # checking creates nothing


# ---- class 2: trainrun-prepare on input without text ----------------------------------------------------------

@pytest.mark.parametrize(("files", "needles"), [
    ({"empty.txt": b""}, ["no text to tokenize", "empty.txt is empty"]),
    ({"empty.jsonl": b"\n\n"}, ["no text to tokenize", "has no non-blank lines"]),
    ({"a.txt": b"", "b.txt": b""}, ["no text to tokenize", "all 2 input files are empty"]),
    ({"blank.jsonl": b'{"text": ""}\n{"text": ""}\n{"text": ""}\n'}, ["all 3 documents are empty"]),
    ({"one.txt": b"just one document\n"}, ["found only 1 document", "one.txt", "give more files"]),
    ({"model.bin": bytes(range(256)) * 4}, ["model.bin:1: binary data (a NUL byte", "leave this one out"]),
    ({"a.txt": b"text\n" * 10, "b.txt": b"PK\x03\x04\x00\x00zip"}, ["b.txt:1: binary data"]),
    ({"late.txt": b"text\n" * 20000 + b"\x00", "ok.txt": b"fine\n"}, ["late.txt:20001: binary data"]),
    ({"utf16.jsonl": '{"text": "hi"}\n'.encode("utf-16-le")}, ["utf16.jsonl:1: binary data"]),
    ({"a.txt": b"fine\n", "latin1.txt": b"caf\xe9\n"}, ["latin1.txt:1: not valid UTF-8"]),
])
def test_prepare_refuses_input_without_text(tmp_path, capsys, files, needles):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, data in files.items():
        (inputs / name).write_bytes(data)
    for tokenizer in ("byte", "bpe"):
        refused(capsys, prepare_main, [inputs, "--output", tmp_path / "out", "--tokenizer", tokenizer,
                                       "--vocab-size", "300"], *needles)
    assert not (tmp_path / "out").exists()


# ---- class 2: trainrun-report on a run directory, and its --output ------------------------------------------

def test_report_reports_a_single_run_directory(tmp_path, capsys):
    run = make_run(tmp_path / "r1")
    assert report_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "r1" in out and "optim.lr=0.001" in out
    assert (run / "report.csv").read_text().count("\n") == 2 and (run / "report.png").stat().st_size > 0
    assert report_main([str(run)]) == 0  # its own earlier report is replaced


def test_report_says_what_it_expects(tmp_path, capsys):
    make_run(tmp_path / "multirun" / "12-00" / "p1")
    refused(capsys, report_main, [tmp_path / "multirun"], "neither a sweep directory", "hydra.sweep.dir",
            f"sweep directories below it: {tmp_path / 'multirun' / '12-00'}")
    refused(capsys, report_main, [tmp_path / "nowhere"], "is not a directory", "sweep directory")


def test_report_never_overwrites_what_it_did_not_write(tmp_path, capsys):
    run = make_run(tmp_path / "r1")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.csv").write_text("my own numbers\n")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "report.png").write_bytes(b"\x89PNG my photo")
    (tmp_path / "afile").write_text("x")
    refused(capsys, report_main, [run, "--output", tmp_path / "mine"], "already holds report.csv")
    refused(capsys, report_main, [run, "--output", tmp_path / "pics"], "already holds report.png")
    refused(capsys, report_main, [run, "--output", tmp_path / "afile"], "is a file")
    refused(capsys, report_main, [run, "--output", tmp_path / "table.csv"], "takes the directory")
    refused(capsys, report_main, [run, "--output", run / "checkpoints"], "checkpoint directory")
    assert (tmp_path / "mine" / "report.csv").read_text() == "my own numbers\n"
    assert (tmp_path / "pics" / "report.png").read_bytes() == b"\x89PNG my photo"
    assert not (run / "checkpoints" / "report.csv").exists() and not (tmp_path / "table.csv").exists()
