"""Read an offline W&B run log (`run-<id>.wandb`), which wandb 0.31 no longer ships a reader for.

Format (a LevelDB-log-style datastore, little-endian): a 7-byte file header (ident b":W&B", uint16 magic
0xBEE1, uint8 version 0), then 32 KiB blocks counted from the start of the file. A block holds records
of uint32 checksum, uint16 length, uint8 type (FULL=1, FIRST=2, MIDDLE=3, LAST=4) and `length` data
bytes; the checksum is zlib's CRC-32 over the type byte followed by the data. A payload split across
blocks is FIRST, MIDDLE..., LAST; fewer than 7 bytes left in a block are zero padding. Each payload is
a serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(data: bytes, source: str = "<bytes>") -> Iterator[bytes]:
    """The assembled record payloads of a `.wandb` file's bytes; raises ValueError on any corruption."""
    if len(data) < FILE_HEADER.size:
        raise ValueError(f"{source}: {len(data)} bytes, too short for a W&B log header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (IDENT, MAGIC, VERSION):
        raise ValueError(f"{source}: not a W&B log version {VERSION} (header {ident!r}, magic {magic:#x}, version {version})")
    offset = FILE_HEADER.size
    parts: list[bytes] | None = None  # fragments of a payload split across blocks
    while offset < len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:
            offset += left_in_block  # padding
            continue
        if len(data) - offset < RECORD_HEADER.size:
            raise ValueError(f"{source}: truncated record header at byte {offset}")
        checksum, length, kind = RECORD_HEADER.unpack_from(data, offset)
        start, end = offset + RECORD_HEADER.size, offset + RECORD_HEADER.size + length
        if end > offset + left_in_block:
            raise ValueError(f"{source}: record at byte {offset} ({length} bytes) crosses a block boundary")
        if end > len(data):
            raise ValueError(f"{source}: truncated record at byte {offset} ({length} bytes, file ends at {len(data)})")
        fragment = data[start:end]
        if zlib.crc32(bytes([kind]) + fragment) != checksum:
            raise ValueError(f"{source}: checksum mismatch in the record at byte {offset}")
        if kind == FULL and parts is None:
            yield fragment
        elif kind == FIRST and parts is None:
            parts = [fragment]
        elif kind == MIDDLE and parts is not None:
            parts.append(fragment)
        elif kind == LAST and parts is not None:
            parts.append(fragment)
            yield b"".join(parts)
            parts = None
        else:
            state = "inside a split record" if parts is not None else "outside a split record"
            raise ValueError(f"{source}: unexpected record type {kind} {state} at byte {offset}")
        offset = end
    if parts is not None:
        raise ValueError(f"{source}: file ends inside a split record")


def read_wandb_records(path: str | Path) -> list[Any]:
    """All records of an offline `.wandb` file, as `wandb_internal_pb2.Record` messages, in file order."""
    from wandb.proto import wandb_internal_pb2  # lazy: wandb's protobufs cost ~0.6 s, only to read an offline run log

    path = Path(path)
    records = []
    for payload in iter_payloads(path.read_bytes(), str(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item: Any) -> str:
    """An item's key: `key`, or its `nested_key` parts joined with '.'."""
    return item.key or ".".join(item.nested_key)


def _items(items: Any) -> dict[str, Any]:
    return {_key(item): json.loads(item.value_json) for item in items}


def summarize_records(records: list[Any]) -> dict[str, Any]:
    """What a run log says: {"run": {id, project, entity, group, name, tags}, "config": {key: value},
    "history": [{"step", "items": {key: value}}], "summary": {key: value}, "exit_code": int | None}.

    Values are JSON-decoded; nested keys are joined with '.'; later config/summary updates win and
    removals apply. W&B's own keys ("_wandb", "_step", "_runtime", ...) are kept as written.
    """
    run: dict[str, Any] = {}
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    exit_code = None

    def apply(target: dict[str, Any], update: Any) -> None:
        target.update(_items(update.update))
        for item in update.remove:
            target.pop(_key(item), None)

    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = {
                "id": r.run_id, "project": r.project, "entity": r.entity, "group": r.run_group, "name": r.display_name, "tags": list(r.tags),
            }
            apply(config, r.config)
        elif kind == "config":
            apply(config, record.config)
        elif kind == "history":
            history.append({"step": record.history.step.num, "items": _items(record.history.item)})
        elif kind == "summary":
            apply(summary, record.summary)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"run": run, "config": config, "history": history, "summary": summary, "exit_code": exit_code}
