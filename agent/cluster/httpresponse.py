"""HTTP/1.x responses, parsed by hand for the wire proof: pure, bounded, junk-tolerant.

The proof speaks HTTP on a bare asyncio stream (urllib could block on DNS, which lab nodes and
fresh Pis lack), so it needs only this: a status line, headers, Content-Length or chunked bodies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent import const

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2: a header field name
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})[ \t]*(?:;[^\r\n]*)?")  # RFC 9112 §7.1
_CHUNK_LINE_MAX = 1024  # bytes; a chunk-size line with extensions, far more than any server sends

@dataclass(frozen=True)
class HttpResponse:
    """A complete HTTP/1.x response: its status code and decoded body."""

    status: int
    body: bytes


class ResponseError(ValueError):
    """An HTTP response we cannot use: malformed, truncated, or larger than its cap."""


# --- HTTP/1.x response parsing (pure) -----------------------------------------------------------


def parse_response(
    data: bytes,
    *,
    eof: bool,
    body_max: int = const.PROBE_BODY_MAX,
    header_max: int = const.PROBE_HEADER_MAX,
) -> HttpResponse | None:
    """The response in `data`, None while more bytes are needed; ResponseError if it is unusable.

    `eof` says the peer has closed: the answer is then a response or an error, never None. No
    input makes this read more than header_max + 2 * body_max bytes, or raise anything else.
    """
    if len(data) > header_max + 2 * body_max:
        raise ResponseError(f"response larger than {header_max + 2 * body_max} bytes")
    end = data.find(b"\r\n\r\n", 0, header_max)
    if end < 0:
        if len(data) >= header_max:
            raise ResponseError(f"response headers longer than {header_max} bytes")
        _closed_inside(eof, "the response headers")
        return None
    status, headers = _head(data[:end])
    rest = data[end + 4 :]
    if status in (204, 304):
        return HttpResponse(status, b"")
    if b"transfer-encoding" in headers:
        codings = [c.strip().lower() for v in headers[b"transfer-encoding"] for c in v.split(b",")]
        if codings != [b"chunked"]:
            raise ResponseError("unsupported transfer-encoding")
        body = _dechunk(rest, eof, body_max, header_max)
        return None if body is None else HttpResponse(status, body)
    if b"content-length" in headers:
        length = _content_length(headers[b"content-length"])
        if length > body_max:
            raise ResponseError(f"body of {length} bytes exceeds the {body_max}-byte cap")
        if len(rest) >= length:
            return HttpResponse(status, rest[:length])
        _closed_inside(eof, "the body")
        return None
    # Neither length nor chunking: the body runs to the close (RFC 9112 §6.3, rule 8).
    if len(rest) > body_max:
        raise ResponseError(f"body exceeds the {body_max}-byte cap")
    return HttpResponse(status, rest) if eof else None


def _head(block: bytes) -> tuple[int, dict[bytes, list[bytes]]]:
    """The status code and the header fields (lowercase names) of a response's head."""
    lines = block.split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise ResponseError("not an HTTP/1.x status line")
    status = int(status_line[1])
    if status < 200:
        raise ResponseError(f"unexpected interim status {status}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise ResponseError("malformed header line")
        headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return status, headers


def _content_length(fields: list[bytes]) -> int:
    """The one length that Content-Length fields agree on (RFC 9110 §8.6)."""
    values = {v.strip() for field in fields for v in field.split(b",")}
    if len(values) != 1:
        raise ResponseError("conflicting content-length")
    value = values.pop()
    if re.fullmatch(rb"[0-9]{1,12}", value) is None:
        raise ResponseError("invalid content-length")
    return int(value)


def _dechunk(data: bytes, eof: bool, body_max: int, trailer_max: int) -> bytes | None:
    """The body of a chunked message (RFC 9112 §7.1), None while incomplete."""
    body = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos, pos + _CHUNK_LINE_MAX)
        if eol < 0:
            if len(data) - pos >= _CHUNK_LINE_MAX:
                raise ResponseError("chunk-size line too long")
            _closed_inside(eof, "a chunk-size line")
            return None
        size_line = _CHUNK_SIZE.fullmatch(data, pos, eol)
        if size_line is None:
            raise ResponseError("malformed chunk-size line")
        size = int(size_line[1], 16)
        start = eol + 2
        if size == 0:  # last chunk, then optional trailer fields and an empty line
            if data.startswith(b"\r\n", start):
                return bytes(body)
            if data.find(b"\r\n\r\n", start, start + trailer_max) >= 0:
                return bytes(body)
            if len(data) - start >= trailer_max:
                raise ResponseError("chunked trailer too long")
            _closed_inside(eof, "the chunked trailer")
            return None
        if len(body) + size > body_max:
            raise ResponseError(f"body exceeds the {body_max}-byte cap")
        if len(data) < start + size + 2:
            _closed_inside(eof, "a chunk")
            return None
        if data[start + size : start + size + 2] != b"\r\n":
            raise ResponseError("chunk not followed by CRLF")
        body += data[start : start + size]
        pos = start + size + 2


def _closed_inside(eof: bool, what: str) -> None:
    """ResponseError when the peer closed (`eof`) before `what` ended."""
    if eof:
        raise ResponseError(f"connection closed inside {what}")


