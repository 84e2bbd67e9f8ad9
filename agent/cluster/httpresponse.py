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
    return ResponseReader(body_max=body_max, header_max=header_max).feed(data, eof=eof)


class ResponseReader:
    """One response fed as it arrives, as parse_response judges the bytes so far; each byte is
    looked at a bounded number of times (a server that sends its answer a byte per TLS record
    must cost the loop linear time: re-parsing all that came at every read was quadratic)."""

    def __init__(
        self, *, body_max: int = const.PROBE_BODY_MAX, header_max: int = const.PROBE_HEADER_MAX
    ) -> None:
        self._body_max, self._header_max = body_max, header_max
        self._data = bytearray()
        self._searched = 0  # the head's end (then a trailer's) is not before this, less 3
        self._start = -1  # where the body starts, once the head is parsed
        self._framing = ""  # "length", "chunked" or "close"
        self._length = 0  # of a Content-Length body
        self._status = 0
        self._pos = 0  # chunked: the next chunk-size line
        self._body = bytearray()  # chunked: the chunks so far

    def feed(self, chunk: bytes, *, eof: bool) -> HttpResponse | None:
        """Add `chunk`; the response once whole, else None; ResponseError if it is unusable."""
        data, header_max, body_max = self._data, self._header_max, self._body_max
        data += chunk
        if len(data) > header_max + 2 * body_max:
            raise ResponseError(f"response larger than {header_max + 2 * body_max} bytes")
        if self._start < 0:
            end = data.find(b"\r\n\r\n", max(self._searched - 3, 0), header_max)
            if end < 0:
                if len(data) >= header_max:
                    raise ResponseError(f"response headers longer than {header_max} bytes")
                self._searched = len(data)
                _closed_inside(eof, "the response headers")
                return None
            if (done := self._head_parsed(end)) is not None:
                return done
        rest = len(data) - self._start
        if self._framing == "chunked":
            return self._dechunk(eof)
        if self._framing == "length":
            if rest >= self._length:
                body = data[self._start : self._start + self._length]
                return HttpResponse(self._status, bytes(body))
            _closed_inside(eof, "the body")
            return None
        # Neither length nor chunking: the body runs to the close (RFC 9112 §6.3, rule 8).
        if rest > body_max:
            raise ResponseError(f"body exceeds the {body_max}-byte cap")
        return HttpResponse(self._status, bytes(data[self._start :])) if eof else None

    def _head_parsed(self, end: int) -> HttpResponse | None:
        """Parse the head ending at `end` and choose the framing; a bodiless response whole."""
        self._status, headers = _head(bytes(self._data[:end]))
        self._start = self._pos = self._searched = end + 4
        if self._status in (204, 304):
            return HttpResponse(self._status, b"")
        if b"transfer-encoding" in headers:
            fields = headers[b"transfer-encoding"]
            codings = [c.strip().lower() for v in fields for c in v.split(b",")]
            if codings != [b"chunked"]:
                raise ResponseError("unsupported transfer-encoding")
            self._framing = "chunked"
        elif b"content-length" in headers:
            self._framing, self._length = "length", _content_length(headers[b"content-length"])
            if self._length > self._body_max:
                raise ResponseError(
                    f"body of {self._length} bytes exceeds the {self._body_max}-byte cap"
                )
        else:
            self._framing = "close"
        return None

    def _dechunk(self, eof: bool) -> HttpResponse | None:
        """The body of a chunked message (RFC 9112 §7.1), None while incomplete; the chunks
        already whole are not read again."""
        data, body = self._data, self._body
        while True:
            pos = self._pos
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
                    return HttpResponse(self._status, bytes(body))
                trailer_max = self._header_max
                searched = max(self._searched - 3, start)
                if data.find(b"\r\n\r\n", searched, start + trailer_max) >= 0:
                    return HttpResponse(self._status, bytes(body))
                if len(data) - start >= trailer_max:
                    raise ResponseError("chunked trailer too long")
                self._searched = len(data)
                _closed_inside(eof, "the chunked trailer")
                return None
            if len(body) + size > self._body_max:
                raise ResponseError(f"body exceeds the {self._body_max}-byte cap")
            if len(data) < start + size + 2:
                _closed_inside(eof, "a chunk")
                return None
            if data[start + size : start + size + 2] != b"\r\n":
                raise ResponseError("chunk not followed by CRLF")
            body += data[start : start + size]
            self._pos = start + size + 2


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


def _closed_inside(eof: bool, what: str) -> None:
    """ResponseError when the peer closed (`eof`) before `what` ended."""
    if eof:
        raise ResponseError(f"connection closed inside {what}")


