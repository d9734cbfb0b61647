"""The local-result wire format, parsed as it streams in.

A local result is the number of training samples as a 4-byte big-endian
unsigned integer followed by the weights as a NumPy `.npy` stream written
with `allow_pickle=False`. Uploads are validated chunk by chunk while they
arrive, so a bad one is refused as soon as its problem is visible and a
good one never has to be held whole in memory.

Layout of an upload::

    offset 0   samples        4 bytes, big-endian unsigned
    offset 4   magic          b"\\x93NUMPY"
    offset 10  version        2 bytes: major, minor (1.0 or 2.0 accepted)
    offset 12  header length  2 bytes (1.0) or 4 bytes (2.0), little-endian
    ...        header         a Python dict literal: descr, fortran_order, shape
    ...        data           prod(shape) * itemsize bytes, nothing after them

What is accepted: `.npy` format 1.0 or 2.0, a header of at most
`MAX_NPY_HEADER_BYTES` bytes holding exactly the keys numpy writes, a real
floating dtype of 2, 4 or 8 bytes in either byte order, any shape (scalars
and zero-size arrays too; the caller decides about those through
`expected_shape`), C or Fortran order, and finite values only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib import format as _npy_format

from xaind.protocol import ErrorCode, Refusal

SAMPLES_BYTES = 4
MAX_SAMPLES = 2**32 - 1

NPY_MAGIC = b"\x93NUMPY"
#: The longest `.npy` header dict accepted (numpy itself writes a few hundred bytes at most).
MAX_NPY_HEADER_BYTES = 64 * 1024
#: Dimensions numpy can represent.
MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32

ACCEPTED_WEIGHT_TYPES = (np.float16, np.float32, np.float64)

_VERSION_OFFSET = SAMPLES_BYTES + len(NPY_MAGIC)  # 10
_LENGTH_OFFSET = _VERSION_OFFSET + 2  # 12
_LENGTH_FIELD_BYTES = {1: 2, 2: 4}  # by major version
_HEADER_KEYS = frozenset({"descr", "fortran_order", "shape"})
_INTP_MAX = int(np.iinfo(np.intp).max)
# Data are checked in slices of at most this many bytes, so the temporaries of
# the finiteness check stay small whatever the size of the chunk fed.
_CHECK_SLICE_BYTES = 1 << 20

_STAGE_PREFIX, _STAGE_LENGTH, _STAGE_HEADER, _STAGE_DATA = range(4)


class UploadRefused(Refusal):
    """An upload that is not a valid local result."""

    code = ErrorCode.MALFORMED_UPLOAD


class MalformedUpload(UploadRefused):
    code = ErrorCode.MALFORMED_UPLOAD


class UploadTooLarge(UploadRefused):
    code = ErrorCode.UPLOAD_TOO_LARGE


class UnacceptableWeights(UploadRefused):
    """Well-formed, but not weights this round can use (dtype, shape, non-finite values)."""

    code = ErrorCode.UNACCEPTABLE_WEIGHTS


@dataclass(frozen=True)
class LocalResultHeader:
    samples: int
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int  # bytes from the start of the upload to the first weight byte

    @property
    def data_bytes(self) -> int:
        # Exact Python integers: a declared shape must never wrap around.
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.data_bytes


def _short_repr(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LocalResultParser:
    """Validates one upload incrementally: feed(chunk) any number of times, then finish().

    Every problem is refused with an `UploadRefused` subclass at the first
    `feed()` whose bytes make it visible; from then on every `feed()` and
    `finish()` raises that same exception. The parser keeps the header bytes
    (at most `MAX_NPY_HEADER_BYTES` plus 16) and at most one partial weight
    element, never the data: the caller stores the bytes it feeds.
    """

    def __init__(self, *, max_bytes: int, expected_shape: tuple[int, ...] | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be non-negative, not {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.expected_shape = None if expected_shape is None else tuple(int(n) for n in expected_shape)
        self.header: LocalResultHeader | None = None
        self.received = 0
        self.error: UploadRefused | None = None
        self._stage = _STAGE_PREFIX
        self._buf = bytearray()  # the bytes before the data
        self._need = _LENGTH_OFFSET  # length _buf must reach to finish the current stage
        self._dtype: np.dtype | None = None
        self._half_exponent: np.uint16 | None = None
        self._data_total = 0
        self._data_seen = 0  # data bytes taken in, the partial element included
        self._partial = b""  # the first bytes of an element split between chunks

    # -- public -------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the upload; raise an `UploadRefused` subclass as soon as one is wrong."""
        if self.error is not None:
            raise self.error.with_traceback(None)  # the same refusal, without growing its traceback
        view = byte_view(data)
        size = len(view)
        start = self.received
        self.received += size
        try:
            allowed = self.max_bytes - start
            if size > allowed and self.header is None:
                # Once the header is known its total is within the limit, so
                # an excess is refused as trailing bytes; before, as too large.
                self._take(view[: max(allowed, 0)])
                if self.header is None:
                    raise UploadTooLarge(
                        f"upload too large: more than the limit of {self.max_bytes} bytes "
                        f"({self.received} bytes received so far)"
                    )
                view = view[allowed:]
            self._take(view)
        except UploadRefused as refusal:
            self.error = refusal
            raise

    def finish(self) -> LocalResultHeader:
        """The header of the complete, valid upload; `MalformedUpload` if it is incomplete."""
        if self.error is not None:
            raise self.error.with_traceback(None)
        if self.header is None:
            if self.received < _VERSION_OFFSET:
                message = (
                    f"incomplete upload: {self.received} bytes, too short for a local result "
                    f"(4-byte sample count and the .npy magic string)"
                )
            else:
                message = f"incomplete upload: {self.received} bytes, the .npy header is not complete"
            self.error = MalformedUpload(message)
            raise self.error
        if self._data_seen < self._data_total:
            self.error = MalformedUpload(
                f"incomplete upload: {self.received} of the {self.header.total_bytes} bytes "
                f"its header announces"
            )
            raise self.error
        return self.header

    @property
    def header_bytes_missing(self) -> int:
        """How many more bytes the header stage needs at least (0 once the header is known)."""
        return 0 if self.header is not None else self._need - len(self._buf)

    # -- header -------------------------------------------------------------

    def _take(self, view: memoryview) -> None:
        pos = 0
        if self._stage != _STAGE_DATA:
            buf = self._buf
            while self._stage != _STAGE_DATA and pos < len(view):
                step = min(self._need - len(buf), len(view) - pos)
                buf += view[pos : pos + step]
                pos += step
                self._advance()
        if pos < len(view):
            self._take_data(view[pos:] if pos else view)

    def _advance(self) -> None:
        """Check what the header bytes so far reveal; move on through the stages they complete."""
        buf = self._buf
        while True:
            have = len(buf)
            if self._stage == _STAGE_PREFIX:
                if have > SAMPLES_BYTES:
                    magic = bytes(buf[SAMPLES_BYTES : min(have, _VERSION_OFFSET)])
                    if magic != NPY_MAGIC[: len(magic)]:
                        raise MalformedUpload(
                            f"not a .npy stream after the 4-byte sample count: magic string "
                            f"{magic!r} instead of {NPY_MAGIC!r}"
                        )
                if have > _VERSION_OFFSET and buf[_VERSION_OFFSET] not in _LENGTH_FIELD_BYTES:
                    raise MalformedUpload(
                        f"unsupported .npy format version {buf[_VERSION_OFFSET]}.x (1.0 and 2.0 accepted)"
                    )
                if have < _LENGTH_OFFSET:
                    return
                major, minor = buf[_VERSION_OFFSET], buf[_VERSION_OFFSET + 1]
                if minor != 0:
                    raise MalformedUpload(
                        f"unsupported .npy format version {major}.{minor} (1.0 and 2.0 accepted)"
                    )
                self._stage = _STAGE_LENGTH
                self._need = _LENGTH_OFFSET + _LENGTH_FIELD_BYTES[major]
            elif self._stage == _STAGE_LENGTH:
                if have < self._need:
                    return
                header_length = int.from_bytes(buf[_LENGTH_OFFSET : self._need], "little")
                if header_length > MAX_NPY_HEADER_BYTES:
                    raise MalformedUpload(
                        f".npy header length {header_length} exceeds the limit of {MAX_NPY_HEADER_BYTES} bytes"
                    )
                data_offset = self._need + header_length
                if data_offset > self.max_bytes:
                    raise UploadTooLarge(
                        f"upload too large: its header alone takes {data_offset} bytes, "
                        f"the limit is {self.max_bytes}"
                    )
                self._stage = _STAGE_HEADER
                self._need = data_offset
            else:  # _STAGE_HEADER
                if have < self._need:
                    return
                self._set_header()
                return

    def _set_header(self) -> None:
        buf = self._buf
        major = buf[_VERSION_OFFSET]
        text = bytes(buf[_LENGTH_OFFSET + _LENGTH_FIELD_BYTES[major] :]).decode("latin1")
        shape, fortran_order, dtype = _parse_npy_header_dict(text)
        if dtype.type not in ACCEPTED_WEIGHT_TYPES or dtype.names is not None or dtype.subdtype is not None:
            raise UnacceptableWeights(
                f"weights of dtype {_short_repr(dtype.descr if dtype.names else dtype.str)} refused: "
                f"only float16, float32 and float64 are accepted"
            )
        if self.expected_shape is not None and shape != self.expected_shape:
            raise UnacceptableWeights(f"weights of shape {shape} refused: this round expects {self.expected_shape}")
        header = LocalResultHeader(
            samples=int.from_bytes(buf[:SAMPLES_BYTES], "big"),
            dtype=dtype,
            shape=shape,
            fortran_order=fortran_order,
            data_offset=len(buf),
        )
        if header.total_bytes > self.max_bytes:
            raise UploadTooLarge(
                f"upload too large: its header announces {header.total_bytes} bytes "
                f"(shape {_short_repr(shape)}, {dtype.str}), the limit is {self.max_bytes}"
            )
        if math.prod(n for n in shape if n) * dtype.itemsize > _INTP_MAX:
            raise MalformedUpload(f"shape {_short_repr(shape)} is too large for an array")
        self._dtype = dtype
        if dtype.itemsize == 2:  # the exponent bits of a float16, as a native uint16 sees them
            self._half_exponent = np.uint16(0x7C00 if dtype.isnative else 0x007C)
        self._data_total = header.data_bytes
        self._stage = _STAGE_DATA
        self.header = header

    # -- data ---------------------------------------------------------------

    def _take_data(self, view: memoryview) -> None:
        room = self._data_total - self._data_seen
        if len(view) > room:
            if room:
                self._check_data(view[:room])
            raise MalformedUpload(
                f"trailing bytes: the header announces {self.header.total_bytes} bytes, "
                f"{self.received} received so far"
            )
        self._check_data(view)

    def _check_data(self, view: memoryview) -> None:
        dtype = self._dtype
        itemsize = dtype.itemsize
        pos = 0
        if self._partial:
            missing = itemsize - len(self._partial)
            if len(view) < missing:
                self._partial += bytes(view)
                self._data_seen += len(view)
                return
            element = self._partial + bytes(view[:missing])
            self._check_finite(np.frombuffer(element, dtype=dtype))
            self._partial = b""
            self._data_seen += missing
            pos = missing
        whole_end = pos + (len(view) - pos) // itemsize * itemsize
        step = _CHECK_SLICE_BYTES // itemsize * itemsize
        while pos < whole_end:
            end = min(pos + step, whole_end)
            self._check_finite(np.frombuffer(view[pos:end], dtype=dtype))
            self._data_seen += end - pos
            pos = end
        if pos < len(view):
            self._partial = bytes(view[pos:])
            self._data_seen += len(view) - pos

    def _check_finite(self, values: np.ndarray) -> None:
        mask = self._half_exponent
        if mask is None:
            if np.isfinite(values).all():
                return
        elif not ((values.view(np.uint16) & mask) == mask).any():
            # float16: np.isfinite converts every element and runs at a third
            # of the speed of this test of the exponent bits (all set: inf or nan).
            return
        index = int(np.argmin(np.isfinite(values)))
        element = self._data_seen // self._dtype.itemsize + index
        raise UnacceptableWeights(
            f"non-finite weight {float(values[index])} at element {element} (in file order) refused"
        )


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """`data` as a flat view of unsigned bytes, copied only when it is not contiguous."""
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    try:
        return view.cast("B")
    except TypeError:  # not C-contiguous
        return memoryview(view.tobytes())


# Only what Python's own tokenizer takes: its whitespace (not `\s`, which
# also matches U+00A0, U+0085 and \v), strings on one line without NUL, and
# decimal ints without leading zeros.
_WHITESPACE = " \t\n\r\f"
_TOKEN = re.compile(
    rf"""[{_WHITESPACE}]*(?:"""
    r"""(?P<string>'[^'\\\n\r\x00]*'|"[^"\\\n\r\x00]*")|(?P<number>-?(?:0+|[1-9][0-9]*))"""
    r"""|(?P<name>True|False|None)|(?P<punctuation>[{}()\[\]:,]))"""
)
_MAX_LITERAL_DEPTH = 16
_NAMES: dict[str, Any] = {"True": True, "False": False, "None": None}


def parse_literal(text: str) -> Any:
    """Parse the Python literal of a `.npy` header (dicts, tuples, lists, strings, ints, booleans).

    A small parser of our own instead of `ast.literal_eval`: headers are
    parsed on the reactor thread while numpy parses stored files' headers
    with `ast` in the worker thread, and CPython before 3.11.8 can fail when
    two threads build ASTs at once (gh-106905). It also refuses what numpy
    never writes (floats, expressions, escapes) and bounds the nesting.
    """
    tokens: list[tuple[str, str]] = []
    position = 0
    stripped = text.rstrip(_WHITESPACE)
    while position < len(stripped):
        match = _TOKEN.match(stripped, position)
        if match is None:
            raise ValueError(f"unexpected text at {position}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    value, end = _parse_value(tokens, 0, 0)
    if end != len(tokens):
        raise ValueError("text after the literal")
    return value


def _parse_value(tokens: list[tuple[str, str]], index: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_LITERAL_DEPTH:
        raise ValueError("nested too deeply")
    if index >= len(tokens):
        raise ValueError("unexpected end")
    kind, text = tokens[index]
    if kind == "string":
        return text[1:-1], index + 1
    if kind == "number":
        if len(text) > 30:
            raise ValueError("number too long")
        return int(text), index + 1
    if kind == "name":
        return _NAMES[text], index + 1
    closing = {"{": "}", "(": ")", "[": "]"}.get(text)
    if closing is None:
        raise ValueError(f"unexpected {text!r}")
    items: list[Any] = []
    index += 1
    while True:
        if index < len(tokens) and tokens[index] == ("punctuation", closing):
            index += 1
            break
        item, index = _parse_value(tokens, index, depth + 1)
        if text == "{":
            if index >= len(tokens) or tokens[index] != ("punctuation", ":"):
                raise ValueError("expected ':'")
            value, index = _parse_value(tokens, index + 1, depth + 1)
            item = (item, value)
        items.append(item)
        if index < len(tokens) and tokens[index] == ("punctuation", ","):
            index += 1
        elif not (index < len(tokens) and tokens[index] == ("punctuation", closing)):
            raise ValueError(f"expected ',' or {closing!r}")
    if text == "{":
        try:
            return dict(items), index
        except TypeError:
            raise ValueError("unhashable dict key") from None
    if text == "(":
        if len(items) == 1 and tokens[index - 2] != ("punctuation", ","):
            return items[0], index  # parentheses around one value, not a tuple
        return tuple(items), index
    return items, index


def _parse_npy_header_dict(text: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The header dict as numpy reads it (`ast.literal_eval`), checked strictly; `MalformedUpload` if wrong."""
    if "\\" in text:
        # numpy never writes one for a floating dtype, and escape sequences are
        # what makes the Python parser emit warnings (SyntaxWarning) on bad input.
        raise MalformedUpload(f".npy header holds a backslash: {_short_repr(text)}")
    try:
        header = parse_literal(text)
    except ValueError as error:
        raise MalformedUpload(f".npy header is not a Python literal ({error}): {_short_repr(text)}") from None
    if not isinstance(header, dict):
        raise MalformedUpload(f".npy header is not a dict: {_short_repr(header)}")
    if header.keys() != _HEADER_KEYS:
        raise MalformedUpload(
            f".npy header keys are {_short_repr(list(header))}, not 'descr', 'fortran_order' and 'shape'"
        )
    shape = header["shape"]
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise MalformedUpload(f".npy header shape is not a tuple of non-negative ints: {_short_repr(shape)}")
    if len(shape) > MAX_NDIM:
        raise MalformedUpload(f".npy header shape has {len(shape)} dimensions, at most {MAX_NDIM} are possible")
    fortran_order = header["fortran_order"]
    if type(fortran_order) is not bool:
        raise MalformedUpload(f".npy header fortran_order is not a bool: {_short_repr(fortran_order)}")
    descr = header["descr"]
    try:
        dtype = _npy_format.descr_to_dtype(descr)
        if not isinstance(dtype, np.dtype):
            raise TypeError(type(dtype).__name__)
    except Exception:  # TypeError, ValueError, KeyError, RecursionError, DeprecationWarning as error...
        raise MalformedUpload(f".npy header descr is not a valid dtype: {_short_repr(descr)}") from None
    return shape, fortran_order, dtype
