"""``trainrun-report <sweep dir>``: one row per sweep point, as a console table, a CSV and a PNG of loss curves.

Each row: the point's id and overrides, its status (finished / running / failed / requeued n
times, from ``trainrun_status.json`` and the run-directory lock), final and best validation loss,
median tokens/s and MFU, peak memory and wall time over all attempts. Given a single run's
directory instead of a sweep's, it reports that run as one row.

``report.csv`` and ``report.png`` go into the directory (or ``--output``); each is written under
a temporary name and renamed into place, and a file of that name that an earlier report did not
write is never overwritten (see :func:`trainrun.outputs.check_output_files`). Problems are one
line on stderr and exit status 2. The PNG needs matplotlib (``pip install 'trainrun[report]'``);
``--no-png`` writes the table and the CSV alone.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import os
import sys
from pathlib import Path

import yaml

from trainrun.extras import MissingExtraError, installed, require
from trainrun.launch.run_status import LOCK_FILE, read_status
from trainrun.observe.analysis import load_metrics, summarize
from trainrun.outputs import OutputError, check_output_files, is_run_dir

REPORT = "trainrun-report"
CSV_FILE, PNG_FILE = "report.csv", "report.png"
PNG_FEATURE = f"{REPORT}'s {PNG_FILE} (loss curves)"

COLUMNS = ("point", "overrides", "status", "steps", "final_val_loss", "best_val_loss", "test_loss", "tokens_per_s",
           "mfu", "peak_mem_gib", "wall_time_s")
# Headers of report.csv files written by earlier versions: still recognised as the report's own.
EARLIER_COLUMNS = (tuple(c for c in COLUMNS if c != "test_loss"),)


def is_running(run_dir: Path) -> bool:
    """Someone holds the run directory's lock right now."""
    lock = run_dir / LOCK_FILE
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def point_status(run_dir: Path, status: dict) -> str:
    """running, finished (after n requeues), requeued n times (stopped early, waiting to resume), failed, ...

    ``status`` is the point's recorded status (:func:`read_status`)."""
    requeues = status.get("requeues", 0)
    if is_running(run_dir):
        return "running"
    word = status.get("status", "not started")
    if word == "resume":
        return f"requeued {requeues} times"
    return f"{word} after {requeues} requeues" if word == "finished" and requeues else word


def point_row(run_dir: Path) -> dict[str, object]:
    """The report row of one point directory."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    status = read_status(run_dir)
    row: dict[str, object] = {"point": run_dir.name, "overrides": " ".join(overrides or []),
                              "status": point_status(run_dir, status)}
    if (run_dir / "metrics.jsonl").is_file():
        metrics = load_metrics(run_dir)
        summary = summarize(metrics)
        row.update(steps=summary["steps"], final_val_loss=summary["final_val_loss"],
                   best_val_loss=summary["best_val_loss"], test_loss=summary["test_loss"],
                   tokens_per_s=summary["median_tokens_per_s"], mfu=summary["median_mfu"])
        # Per-source losses of a blend (final_val_loss/<source>): sortable with --sort-by, not table columns.
        row.update({k: v for k, v in summary.items() if k.startswith("final_val_loss/")})
        peaks = [r.get("mem_peak_gib", r.get("mem_gib")) for r in metrics.train]
        row["peak_mem_gib"] = max((p for p in peaks if p is not None), default=None)
    attempts = status.get("attempts", [])
    if attempts:
        row["wall_time_s"] = sum(a["time"] - a.get("started", a["time"]) for a in attempts)
    return row


def sweep_rows(sweep_dir: Path, sort_by: str = "final_val_loss") -> list[dict[str, object]]:
    """Rows of every point directory (one holding ``.hydra/``) of ``sweep_dir``, lowest ``sort_by`` first."""
    rows = [point_row(p) for p in sorted(sweep_dir.iterdir()) if (p / ".hydra").is_dir()]
    return sorted(rows, key=lambda r: (not isinstance(r.get(sort_by), (int, float)), r.get(sort_by) or 0.0))


def report_rows(directory: Path, sort_by: str = "final_val_loss") -> list[dict[str, object]]:
    """:func:`sweep_rows` of a sweep directory, or the one row of a single run's directory (empty if neither)."""
    rows = sweep_rows(directory, sort_by)
    if not rows and is_run_dir(directory):
        rows = [point_row(directory)]
    return rows


def _run_dir(sweep_dir: Path, point: str) -> Path:
    """The directory of the report row ``point``: a point of ``sweep_dir``, or ``sweep_dir`` itself for a single run."""
    candidate = sweep_dir / point
    return candidate if candidate.is_dir() or sweep_dir.name != point else sweep_dir


def not_a_sweep(directory: Path) -> str:
    """What ``directory`` lacks and where to point the report instead (one line)."""
    below = []
    for child in sorted(p for p in directory.iterdir() if p.is_dir()):
        if any((p / ".hydra").is_dir() for p in child.iterdir() if p.is_dir()):
            below.append(str(child))
    hint = f"; sweep directories below it: {', '.join(below[:3])}{' ...' if len(below) > 3 else ''}" if below else ""
    return (f"{directory} is neither a sweep directory (one subdirectory per point, each with .hydra/) nor a run "
            "directory (with .hydra/, metrics.jsonl or trainrun_status.json); pass a multirun's hydra.sweep.dir "
            f"(e.g. multirun/<date>/<time>) or one run's directory{hint}")


def format_table(rows: list[dict[str, object]]) -> str:
    """A fixed-width console table."""
    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    cells = [[cell(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def plot_sweep(sweep_dir: Path, rows: list[dict[str, object]], path: Path) -> Path:
    """Training and validation loss of every point on one figure."""
    require("matplotlib", "report", PNG_FEATURE)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        run_dir = _run_dir(sweep_dir, str(row["point"]))
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        metrics = load_metrics(run_dir)
        label = str(row["overrides"]) or str(row["point"])
        ax_train.plot([r["step"] for r in metrics.train], [r["loss"] for r in metrics.train], label=label)
        if metrics.eval:
            ax_val.plot([r["step"] for r in metrics.eval], [r["val_loss"] for r in metrics.eval], "o-", label=label)
    ax_train.set(xlabel="step", ylabel="loss (nats/token)", title="training loss")
    ax_val.set(xlabel="step", ylabel="loss (nats/token)", title="validation loss")
    if ax_val.get_legend_handles_labels()[0]:  # no evals yet: matplotlib would warn about an empty legend
        ax_val.legend(fontsize="small")
    fig.tight_layout()
    # The Software tag lets a later report recognise the file as its own (and so replace it).
    fig.savefig(path, dpi=100, format="png", metadata={"Software": REPORT})
    plt.close(fig)
    return path


def is_own_report(path: Path) -> bool:
    """``path`` is a report.csv or report.png that trainrun-report wrote (so a new report may replace it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if path.name == CSV_FILE:
        return head.split(b"\n", 1)[0].strip() in {",".join(c).encode() for c in (COLUMNS, *EARLIER_COLUMNS)}
    # PNGs written before they were tagged: recognised by the report.csv written with them.
    return REPORT.encode() in head or is_own_report(path.with_name(CSV_FILE))


def _replace_file(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_report(sweep_dir: Path, rows: list[dict[str, object]], out: Path, png: bool = True) -> None:
    """Write report.csv and (``png``) report.png of ``rows`` into ``out`` (created if missing)."""
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({c: r.get(c) for c in COLUMNS} for r in rows)

    out.mkdir(parents=True, exist_ok=True)
    _replace_file(out / CSV_FILE, write_csv)
    if png:
        _replace_file(out / PNG_FILE, lambda tmp: plot_sweep(sweep_dir, rows, tmp))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: print the table, write ``report.csv`` and ``report.png`` into the sweep directory."""
    parser = argparse.ArgumentParser(prog=REPORT, description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (hydra.sweep.dir), or a single run's directory")
    parser.add_argument("--output", type=Path, default=None,
                        help="directory where report.csv/.png go (default: the sweep or run directory)")
    parser.add_argument("--no-png", action="store_true", help="write the table and report.csv only (no matplotlib)")
    parser.add_argument("--sort-by", default="final_val_loss", metavar="KEY",
                        help="order points by this key, lowest first: final_val_loss (default), best_val_loss, "
                             "test_loss, or a blend source's final_val_loss/<source>")
    args = parser.parse_args(argv)
    if not args.no_png and not installed("matplotlib"):
        print(f"{REPORT}: error: {MissingExtraError(PNG_FEATURE, 'matplotlib', 'report')} (or pass --no-png)",
              file=sys.stderr)
        return 2
    if not args.sweep_dir.is_dir():
        print(f"{REPORT}: error: {args.sweep_dir} is not a directory; pass a sweep directory (hydra.sweep.dir) "
              "or a run directory", file=sys.stderr)
        return 2
    rows = report_rows(args.sweep_dir, args.sort_by)
    if not rows:
        print(f"{REPORT}: error: {not_a_sweep(args.sweep_dir)}", file=sys.stderr)
        return 2
    if args.sort_by not in COLUMNS and not any(args.sort_by in r for r in rows):
        keys = sorted({k for r in rows for k in r if k.startswith("final_val_loss/")})
        print(f"{REPORT}: error: --sort-by {args.sort_by}: no point logged it; use one of final_val_loss, "
              f"best_val_loss, test_loss{''.join(', ' + k for k in keys)}", file=sys.stderr)
        return 2
    out = args.output or args.sweep_dir
    if out.suffix.lower() in (".csv", ".png") and not out.is_dir():
        print(f"{REPORT}: error: --output {out} looks like a file name; --output takes the directory where "
              f"{CSV_FILE} and {PNG_FILE} are written", file=sys.stderr)
        return 2
    try:
        check_output_files(out, REPORT, (CSV_FILE,) if args.no_png else (CSV_FILE, PNG_FILE), is_own_report)
        write_report(args.sweep_dir, rows, out, png=not args.no_png)
    except OutputError as err:
        print(f"{REPORT}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{REPORT}: error: --output {out} could not be written ({err.strerror or err}); set --output to a "
              "directory you can write to", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"\nwrote {out / CSV_FILE}" + ("" if args.no_png else f" and {out / PNG_FILE}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
