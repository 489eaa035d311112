"""The raw bytes of a predictions file, checked before anything parses them (stdlib only, and the schema name).

`check_predictions_bytes(path, max_bytes)` reads the file in chunks of 1 MB, keeping only a few bytes and a
stack of at most MAX_DEPTH open brackets between chunks, and stops at the first byte that proves the file is not
a predictions document:

- larger than `max_bytes` (`max_predictions_bytes()`: 256 MB, or PROSPECT_MAX_PREDICTIONS_MB) - refused
  from its size alone, before a byte is read;
- not UTF-8 (the message is the one Python's decoder gives for the whole file);
- not starting with '{' (a predictions document is one JSON object), or with data after that object ends;
- an object whose first key is not "schema" (or "conversations"), or whose schema is another;
- a bracket that closes the wrong kind, or brackets nested more than MAX_DEPTH deep outside strings (a
  predictions document nests 5 levels: the document, its conversations, a conversation, its frames, a frame).

What passes is at most MAX_DEPTH levels deep, so `json.loads` cannot run out of stack on it; the JSON syntax
proper and the document's shape are checked after parsing (`prospect.eval.evaluation.validate_predictions`).
Each refusal is a `NotPredictions` whose message is one line, without the file's name (the caller adds it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

from prospect.stream.frame_record import PREDICTIONS_SCHEMA

MB = 2**20
MAX_DEPTH = 64  # bracket levels outside strings; a predictions document has 5
DEFAULT_MAX_MB = 256  # a ProAssist test split with P(speak) per frame writes tens of MB; json.loads takes up to ~30x the size
MAX_MB_VARIABLE = "PROSPECT_MAX_PREDICTIONS_MB"
CHUNK_BYTES = MB
EXPECTED = f"a predictions document is a JSON object with schema {PREDICTIONS_SCHEMA!r}"

_WHITESPACE = re.compile(rb"[ \t\r\n]*+")
# outside strings: everything but brackets and quotes, and whole strings (escapes included), in one C-level match
_OUTSIDE = re.compile(rb'(?:[^"\[\]{}]++|"(?:[^"\\]++|\\.)*+")*+', re.DOTALL)
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)  # the rest of a string cut by a chunk's end
_CLOSES = {ord("}"): ord("{"), ord("]"): ord("[")}
_START, _INSIDE, _AFTER = "start", "inside", "after"


class NotPredictions(ValueError):
    """The file is not a predictions document; str() is one line, without the file's name."""


def max_predictions_bytes(environ: Mapping[str, str] | None = None) -> int:
    """The size limit: PROSPECT_MAX_PREDICTIONS_MB megabytes (2**20 bytes) when set, else DEFAULT_MAX_MB."""
    value = (os.environ if environ is None else environ).get(MAX_MB_VARIABLE, "").strip()
    if not value:
        return DEFAULT_MAX_MB * MB
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = float("nan")
    if not megabytes > 0 or megabytes == float("inf"):
        raise NotPredictions(f"{MAX_MB_VARIABLE}={value!r}: must be a positive number of megabytes")
    return int(megabytes * MB)


def _megabytes(size: int) -> str:
    return f"{size / MB:.0f} MB" if size >= 10 * MB else f"{size / MB:.1f} MB"


def _shown(data: bytes, pos: int) -> str:
    """The character at data[pos], as repr shows it."""
    return repr(data[pos:pos + 4].decode("utf-8", "replace")[:1])


def _decode_error(error: UnicodeDecodeError, base: int) -> str:
    """The message str(error) would give had the whole file been decoded (positions counted from its start)."""
    start, end = base + error.start, base + error.end
    if error.end - error.start == 1:
        where = f"byte 0x{error.object[error.start]:02x} in position {start}"
    else:
        where = f"bytes in position {start}-{end - 1}"
    return f"not JSON ('{error.encoding}' codec can't decode {where}: {error.reason})"


class _Scanner:
    """The structure of the bytes fed so far: before the document, inside it (a stack of open brackets), after it."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.state = _START
        self.stack: list[tuple[int, int]] = []  # (opening bracket, its byte offset)
        self.in_string = False
        self.escaped = False  # the last chunk ended with a backslash inside a string
        self.opened = 0  # the byte offset of the document's '{'

    def feed(self, data: bytes, base: int) -> None:
        """Scan data, whose first byte is at offset `base` of the file; raises NotPredictions."""
        pos, end = 0, len(data)
        while pos < end:
            if self.state == _START:
                pos = _WHITESPACE.match(data, pos).end()
                if pos == end:
                    return
                if data[pos] != ord("{"):
                    what = " (an array)" if data[pos] == ord("[") else ""
                    raise NotPredictions(f"starts with {_shown(data, pos)}{what} at byte {base + pos}, not '{{': {EXPECTED}")
                self.state = _INSIDE
                self.stack.append((data[pos], base + pos))
                pos += 1
            elif self.state == _AFTER:
                pos = _WHITESPACE.match(data, pos).end()
                if pos < end:
                    raise NotPredictions(f"not JSON: {_shown(data, pos)} at byte {base + pos} after the document's end "
                                         f"(the object that starts at byte {self.opened})")
            elif self.in_string:
                if self.escaped:
                    pos, self.escaped = pos + 1, False
                    continue
                pos = _STRING_REST.match(data, pos).end()
                if pos == end:
                    return
                if data[pos] == ord("\\"):  # the chunk's last byte: the escaped byte is in the next chunk
                    self.escaped = True
                    return
                self.in_string = False  # the closing quote
                pos += 1
            else:
                pos = _OUTSIDE.match(data, pos).end()
                if pos == end:
                    return
                byte = data[pos]
                if byte == ord('"'):  # a string that does not end in this chunk
                    self.in_string = True
                elif byte in _CLOSES:
                    opener, at = self.stack.pop()
                    if opener != _CLOSES[byte]:
                        raise NotPredictions(f"not JSON: {chr(byte)!r} at byte {base + pos} closes the {chr(opener)!r} "
                                             f"at byte {at}")
                    if not self.stack:
                        self.state, self.opened = _AFTER, at
                else:
                    self.stack.append((byte, base + pos))
                    if len(self.stack) > self.max_depth:
                        raise NotPredictions(f"nested more than {self.max_depth} levels deep at byte {base + pos} "
                                             "(a predictions document nests 5)")
                pos += 1

    def finish(self) -> None:
        if self.state == _START:
            raise NotPredictions(f"empty, or only whitespace: {EXPECTED}")
        # a document cut short (open brackets or string left) is for json.loads to report with its line and column


_FIRST_KEY = re.compile(rb'\s*\{\s*"([^"\\]{0,200})"\s*:\s*("[^"\\]{0,200}")?')


def _check_head(path: Path) -> None:
    """Refuse from its first key a JSON object that is something else, before any parse of the whole: a
    predictions document starts with `"schema": "prospect.predictions/1"` (or with "conversations", if a tool
    sorted its keys)."""
    with path.open("rb") as file:
        head = file.read(4096)
    match = _FIRST_KEY.match(head)
    if match is None:
        return  # not an object, or a key with escapes: the scan and the parse say what is wrong
    key = match.group(1).decode("utf-8", "replace")
    if key not in ("schema", "conversations"):
        raise NotPredictions(f"its first key is {key!r}, not 'schema': {EXPECTED}")
    if key == "schema" and match.group(2) is not None:
        schema = match.group(2).decode("utf-8", "replace")[1:-1]
        if schema != PREDICTIONS_SCHEMA:
            raise NotPredictions(f"schema={schema!r}; expected {PREDICTIONS_SCHEMA!r}")


def check_predictions_bytes(path: str | Path, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> int:
    """Refuse what cannot be a predictions document from its size and its raw bytes, read in chunks (see
    the module's docstring); returns the file's size. Raises NotPredictions (one line, no file name) and
    OSError when the file cannot be read."""
    path = Path(path)
    limit = max_predictions_bytes() if max_bytes is None else max_bytes
    size = path.stat().st_size

    def too_large(size: int) -> NotPredictions:
        return NotPredictions(f"{_megabytes(size)}, more than the {_megabytes(limit)} a predictions file may be "
                              f"(set {MAX_MB_VARIABLE} to raise the limit)")

    if size > limit:
        raise too_large(size)
    _check_head(path)
    scanner = _Scanner(max_depth)
    carry, base, read = b"", 0, 0  # carry: a UTF-8 sequence cut by the chunk's end, at offset base
    with path.open("rb") as file:
        while True:
            chunk = file.read(CHUNK_BYTES)
            read += len(chunk)
            if read > limit:  # the file grew since stat
                raise too_large(read)
            data, final = carry + chunk, not chunk
            try:
                data.decode("utf-8")
                valid, decode_error = len(data), None
            except UnicodeDecodeError as error:
                if not final and error.end == len(data) and error.reason == "unexpected end of data":
                    valid, decode_error = error.start, None  # completed by the next chunk
                else:
                    valid, decode_error = error.start, error
            scanner.feed(data[:valid], base)  # a structural fault before the undecodable byte comes first
            if decode_error is not None:
                raise NotPredictions(_decode_error(decode_error, base))
            if final:
                break
            carry, base = data[valid:], base + valid
    scanner.finish()
    return read
