"""Read back what wandb writes in offline mode (its .wandb transaction log)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def read_wandb_records(path: Path) -> list:
    """Decode a .wandb transaction log: a 7-byte ':W&B' header, then LevelDB-log framed protobufs.

    wandb 0.31 dropped the Python ``datastore`` reader (the Go core writes the file), so the
    framing is decoded here: 32 KiB blocks of [crc32 u32][length u16][type u8][payload] chunks
    (type 1 full, 2 first, 3 middle, 4 last); a block tail shorter than 7 bytes is padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, payloads = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def read_finished_wandb_file(path: Path, timeout_s: float = 15.0) -> list:
    """Records of a finished offline run, waiting for wandb-core to flush them.

    ``wandb.finish()`` returns before the wandb-core service has written the records to disk
    (seen with 0.31: right after finish the file can hold only its 7-byte header), so poll
    until the final ``exit`` record is there.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_wandb_records(path)
        except Exception:  # noqa: BLE001 - missing, or a record only half written so far: poll again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def history_rows(records: list) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in items})
    return rows
