"""Compressed request bodies decode alike however the network splits them: a decoder is fed
what each read returns, down to one byte at a time."""

from __future__ import annotations

import gzip
import zlib

import pytest

from ferry.server.http.encodings import ENCODINGS, BodyError, brotli, decoder

PLAIN = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1],"data":[1]}]}' * 20
LIMIT = 1 << 20


def _encode(encoding: str, raw_deflate: bool = False) -> bytes:
    if encoding == "gzip":
        return gzip.compress(PLAIN)
    if encoding == "deflate":
        if raw_deflate:
            d = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            return d.compress(PLAIN) + d.flush()
        return zlib.compress(PLAIN)
    assert brotli is not None
    return bytes(brotli.compress(PLAIN))


def _decode(encoding: str, pieces: list[bytes]) -> bytes:
    d = decoder(encoding)
    assert d is not None
    out = b""
    for piece in pieces:
        out += d.feed(piece, LIMIT - len(out))
    d.finish()
    return out


CASES = [(e, False) for e in ENCODINGS] + [("deflate", True)]


@pytest.mark.parametrize(("encoding", "raw_deflate"), CASES)
@pytest.mark.parametrize("first", [1, 2, 3])
def test_a_body_split_after_its_first_bytes_decodes_whole(
    encoding: str, raw_deflate: bool, first: int
) -> None:
    # A zlib-wrapped deflate body whose first read held one byte was taken for raw deflate
    # (its header's two bytes decide) and refused as "not valid deflate data".
    body = _encode(encoding, raw_deflate)
    assert _decode(encoding, [body[:first], body[first:]]) == PLAIN


@pytest.mark.parametrize(("encoding", "raw_deflate"), CASES)
def test_a_body_fed_one_byte_at_a_time_decodes_whole(encoding: str, raw_deflate: bool) -> None:
    body = _encode(encoding, raw_deflate)
    assert _decode(encoding, [body[i : i + 1] for i in range(len(body))]) == PLAIN


def test_a_deflate_body_of_one_byte_is_cut_short() -> None:
    with pytest.raises(BodyError, match="cut short"):
        _decode("deflate", [zlib.compress(PLAIN)[:1]])
    with pytest.raises(BodyError, match="empty"):
        _decode("deflate", [])
