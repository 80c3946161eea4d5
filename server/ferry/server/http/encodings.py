"""Request bodies sent compressed (``Content-Encoding``), decoded here rather than by aiohttp.

aiohttp's own decoding accepts a gzip body that stops before its end: it hands on whatever the
truncated stream decoded to, so a cut upload reached the JSON parser and was refused as "not
valid JSON" (or, cut at a lucky place, was read without its checksum ever being checked). Here
every encoding must end where its format says it ends, with its checksum verified, or the body
is refused as truncated; and what it decodes to is bounded as it is produced, so a small body
that expands to gigabytes is refused before it is held.
"""

from __future__ import annotations

import zlib
from typing import Protocol

try:
    from aiohttp.compression_utils import HAS_BROTLI, brotli
except ImportError:  # an aiohttp that moved it: decode no brotli rather than guess
    HAS_BROTLI = False
    brotli = None


class BodyError(ValueError):
    """The body is not what its Content-Encoding says (the message says how)."""


class Decoder(Protocol):
    def feed(self, data: bytes, room: int) -> bytes:
        """Decoded bytes of ``data``; more than ``room`` bytes means the body is over the
        limit (the caller refuses it)."""

    def finish(self) -> None:
        """Raise BodyError unless the encoded stream ended where its format says it ends."""


class _Zlib:
    """gzip (RFC 1952, members one after another as the format allows) or deflate (RFC 1950's
    zlib stream; a raw RFC 1951 stream too, which some clients send for "deflate")."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._gzip = encoding == "gzip"
        self._d: zlib._Decompress | None = None
        self._ended = False  # the current stream (member) has reached its end
        # deflate's first bytes, held until there are two: they say whether the stream is
        # zlib-wrapped, and a body may arrive one byte at a time (a chunk of one byte).
        self._head = b""

    def _new(self, first: bytes) -> zlib._Decompress:
        if self._gzip:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # zlib's header: CMF 8 (deflate) with a check that makes CMF*256+FLG a multiple of 31.
        wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def feed(self, data: bytes, room: int) -> bytes:
        out: list[bytes] = []
        produced = 0
        if self._head:
            data, self._head = self._head + data, b""
        while data:
            if self._d is None or self._ended:
                if self._ended and not self._gzip:
                    raise BodyError(f"the {self._encoding} body has data after its end")
                if not self._gzip and len(data) < 2:
                    self._head = data
                    break
                self._d, self._ended = self._new(data), False
            try:
                chunk = self._d.decompress(data, max(1, room - produced + 1))
            except zlib.error as exc:
                raise BodyError(f"the body is not valid {self._encoding} data ({exc})") from None
            out.append(chunk)
            produced += len(chunk)
            if produced > room:
                break
            if self._d.eof:
                self._ended = True
                data = self._d.unused_data
            else:
                data = self._d.unconsumed_tail
        return b"".join(out)

    def finish(self) -> None:
        if self._d is None and not self._head:
            raise BodyError(f"the body is empty, which is not {self._encoding} data")
        if not self._ended:
            raise BodyError(
                f"the {self._encoding} body ends before its compressed stream does: it was "
                "cut short (send the whole body, and its Content-Length if you set one)"
            )


class _Brotli:
    def __init__(self) -> None:
        assert brotli is not None
        self._d = brotli.Decompressor()

    def feed(self, data: bytes, room: int) -> bytes:
        try:
            if not hasattr(self._d, "can_accept_more_data"):  # Brotli < 1.2: no output bound
                return bytes(self._d.process(data))
            out = [self._d.process(data, output_buffer_limit=room + 1)]
            produced = len(out[0])
            while produced <= room and not self._d.can_accept_more_data():
                out.append(self._d.process(b"", output_buffer_limit=room - produced + 1))
                produced += len(out[-1])
        except brotli.error as exc:
            raise BodyError(f"the body is not valid br data ({exc})") from None
        return b"".join(out)

    def finish(self) -> None:
        if not self._d.is_finished():
            raise BodyError(
                "the br body ends before its compressed stream does: it was cut short (send "
                "the whole body, and its Content-Length if you set one)"
            )


# The encodings a request body may come in; "" and identity are the body as it is.
ENCODINGS = ("gzip", "deflate", *(("br",) if HAS_BROTLI else ()))


def decoder(encoding: str) -> Decoder | None:
    """The decoder for a Content-Encoding in ENCODINGS; None for a body sent as it is."""
    if encoding in ("", "identity"):
        return None
    if encoding == "br":
        return _Brotli()
    return _Zlib(encoding)
