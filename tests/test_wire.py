"""The local-result wire format: encoding, streaming validation, stored headers."""

from __future__ import annotations

import ast
import io
import math
import random
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from xaind import wire
from xaind.testing.wire import encode_local_result, parse_local_result, read_local_result_header
from xaind.web import http_status
from xaind.wire import (
    SAMPLES_BYTES,
    LocalResultHeader,
    LocalResultParser,
    MalformedUpload,
    UnacceptableWeights,
    UploadRefused,
    UploadTooLarge,
)

# A warning is a failure here: under this filter a warning raised inside the
# parser must still come out as an UploadRefused, never as anything else.
pytestmark = pytest.mark.filterwarnings("error")

BIG = 2**40
DTYPES = ["<f2", ">f2", "<f4", ">f4", "<f8", ">f8"]
SHAPES = [(), (0,), (1,), (5,), (3, 4), (0, 3), (2, 3, 4), (1, 1, 2)]
SAMPLES = [0, 1, 2**32 - 1]
REFUSALS = (MalformedUpload, UploadTooLarge, UnacceptableWeights)


# -- helpers ------------------------------------------------------------------


def weights_of(dtype: str, shape: tuple[int, ...], fortran: bool, seed: int = 0) -> np.ndarray:
    """Weights exercising the whole finite range: extremes, subnormals, signed zeros."""
    info = np.finfo(np.dtype(dtype))
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(math.prod(shape)) * 100
    specials = [info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0, 1.0]
    values[: len(specials)] = specials[: values.size]
    weights = values.astype(dtype).reshape(shape)
    return np.array(weights, order="F" if fortran else "C")  # (np.ascontiguousarray makes scalars 1-d)


def numpy_wrote(weights: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, weights, allow_pickle=False)
    return stream.getvalue()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def chunkings(data: bytes, seed: int) -> list[list[bytes]]:
    rng = random.Random(seed)
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    for _ in range(3):
        ways.append(split(data, [rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 8))]))
    return ways


def run(chunks, **kwargs) -> LocalResultHeader | UploadRefused:
    """Feed the chunks, then finish: the header, or the refusal (anything else escapes)."""
    kwargs.setdefault("max_bytes", BIG)
    parser = LocalResultParser(**kwargs)
    try:
        for chunk in chunks:
            parser.feed(chunk)
        return parser.finish()
    except UploadRefused as refusal:
        return refusal


def refusal_point(data: bytes, **kwargs) -> tuple[int, UploadRefused]:
    """Feed one byte at a time: (index of the byte whose feed raised, or len(data) for finish(), refusal)."""
    kwargs.setdefault("max_bytes", BIG)
    parser = LocalResultParser(**kwargs)
    for index in range(len(data)):
        try:
            parser.feed(data[index : index + 1])
        except UploadRefused as refusal:
            return index, refusal
    try:
        parser.finish()
    except UploadRefused as refusal:
        return len(data), refusal
    raise AssertionError("the upload was accepted")


def craft(header: str | bytes, data: bytes = b"", *, version=(1, 0), samples: int = 5, length: int | None = None):
    """A local result with a hand-written .npy header (no padding, no check)."""
    raw = header.encode("latin1") if isinstance(header, str) else header
    field = 2 if version[0] == 1 else 4
    size = len(raw) if length is None else length
    return (
        samples.to_bytes(4, "big") + b"\x93NUMPY" + bytes(version) + size.to_bytes(field, "little") + raw + data
    )


def header_text(descr="'<f4'", fortran="False", shape="(2,)") -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}\n"


VALID = encode_local_result(3, np.arange(6, dtype="<f4"))
VALID_OFFSET = run([VALID]).data_offset  # 4 + 128


def with_byte(data: bytes, index: int, value: int) -> bytes:
    return data[:index] + bytes([value]) + data[index + 1 :]


# -- round trips --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fortran", [False, True], ids=["C", "F"])
def test_round_trip(dtype, shape, fortran):
    weights = weights_of(dtype, shape, fortran)
    npy = numpy_wrote(weights)
    for samples in SAMPLES:
        data = encode_local_result(samples, weights)
        assert data == samples.to_bytes(4, "big") + npy
        got_samples, got = parse_local_result(data)
        assert got_samples == samples
        assert got.dtype == weights.dtype and got.shape == weights.shape
        assert np.array_equal(got, weights)
        assert got.tobytes() == weights.tobytes()  # bit for bit: signed zeros, subnormals
        loaded = np.load(io.BytesIO(npy), allow_pickle=False)
        assert got.dtype == loaded.dtype and np.array_equal(got, loaded)
        header = run([data])
        assert header == LocalResultHeader(
            samples=samples,
            dtype=np.dtype(dtype),
            shape=shape,
            fortran_order=weights.flags.f_contiguous and not weights.flags.c_contiguous,
            data_offset=len(data) - weights.nbytes,
        )
        assert header.total_bytes == len(data)
        for chunks in chunkings(data, seed=samples):
            assert run(chunks) == header


def test_fortran_order_is_recorded():
    weights = np.asfortranarray(np.arange(12, dtype=">f8").reshape(3, 4))
    samples, got = parse_local_result(encode_local_result(9, weights))
    assert run([encode_local_result(9, weights)]).fortran_order is True
    assert samples == 9 and got.flags.f_contiguous and not got.flags.c_contiguous
    assert np.array_equal(got, weights) and got.dtype == weights.dtype


def test_npy_format_2_0_is_accepted():
    weights = np.linspace(-1, 1, 7, dtype="<f4")
    stream = io.BytesIO()
    np.lib.format.write_array(stream, weights, version=(2, 0), allow_pickle=False)
    data = (77).to_bytes(4, "big") + stream.getvalue()
    samples, got = parse_local_result(data)
    assert samples == 77 and np.array_equal(got, weights) and got.dtype == weights.dtype
    for chunks in chunkings(data, seed=2):
        assert run(chunks) == run([data])


def test_header_appears_when_the_npy_header_is_complete_and_received_counts_bytes():
    parser = LocalResultParser(max_bytes=BIG)
    for index in range(len(VALID)):
        parser.feed(VALID[index : index + 1])
        assert parser.received == index + 1
        assert (parser.header is not None) == (index + 1 >= VALID_OFFSET)
    assert parser.finish() == parser.header
    assert parser.header.samples == 3 and parser.header.shape == (6,)


def test_bytearray_and_memoryview_inputs():
    weights = np.arange(20, dtype="<f8").reshape(4, 5)
    data = encode_local_result(1, weights)
    assert run([bytearray(data)]) == run([data])
    assert run([memoryview(data)[:50], memoryview(data)[50:]]) == run([data])
    as_floats = memoryview(np.frombuffer(data[: len(data) // 4 * 4], dtype="<f4"))  # format 'f'
    assert run([as_floats, data[len(data) // 4 * 4 :]]) == run([data])
    spaced = np.zeros(2 * len(data), dtype="u1")
    spaced[::2] = np.frombuffer(data, dtype="u1")
    assert run([memoryview(spaced[::2])]) == run([data])  # not contiguous
    samples, got = parse_local_result(memoryview(data))
    assert samples == 1 and np.array_equal(got, weights)


def test_parse_returns_a_view_not_a_copy():
    data = encode_local_result(1, np.ones(1000, dtype="<f4"))
    _, got = parse_local_result(data)
    assert not got.flags.writeable and not got.flags.owndata


def test_encode_checks_samples():
    with pytest.raises(ValueError, match="samples"):
        encode_local_result(2**32, np.zeros(1, dtype="<f4"))
    with pytest.raises(ValueError, match="samples"):
        encode_local_result(-1, np.zeros(1, dtype="<f4"))
    with pytest.raises(TypeError):
        encode_local_result(1.5, np.zeros(1, dtype="<f4"))


# -- refusals, each at the earliest feed ---------------------------------------

F2_NAN = encode_local_result(1, np.array([1, np.nan, 2], dtype="<f2"))
F2_BE_INF = encode_local_result(1, np.array([-np.inf, 1, 2], dtype=">f2"))
F8_VALUES = encode_local_result(1, np.array([1.0, 2.0, 3.0], dtype=">f8"))
F8_OFFSET = len(F8_VALUES) - 24
EMPTY = encode_local_result(1, np.zeros((0, 4), dtype="<f4"))
LONG_HEADER = header_text(shape="(2,)").rstrip("\n") + " " * 70_000 + "\n"
LONGDOUBLE = np.dtype(np.longdouble).str


def nonfinite_f8(index: int, value: float) -> bytes:
    return F8_VALUES[: F8_OFFSET + 8 * index] + np.array([value], ">f8").tobytes() + F8_VALUES[F8_OFFSET + 8 * index + 8 :]


def last(data: bytes) -> int:
    return len(data) - 1


# (id, upload, parser keyword arguments, refusal class, index of the byte whose feed raises
#  (len(upload) for finish()), words the message must contain)
REFUSAL_CASES = [
    ("empty", b"", {}, MalformedUpload, 0, "too short"),
    ("count-only", VALID[:4], {}, MalformedUpload, 4, "too short"),
    ("magic-cut", VALID[:9], {}, MalformedUpload, 9, "too short"),
    ("header-cut", VALID[:60], {}, MalformedUpload, 60, "header is not complete"),
    ("data-cut", VALID[:-1], {}, MalformedUpload, last(VALID), "incomplete"),
    ("data-missing", VALID[:VALID_OFFSET], {}, MalformedUpload, VALID_OFFSET, "incomplete"),
    ("magic-first-byte", with_byte(VALID, 4, 0x00), {}, MalformedUpload, 4, "magic"),
    ("magic-last-byte", with_byte(VALID, 9, ord("X")), {}, MalformedUpload, 9, "magic"),
    ("version-3.0", with_byte(VALID, 10, 3), {}, MalformedUpload, 10, "version 3"),
    ("version-0.x", with_byte(VALID, 10, 0), {}, MalformedUpload, 10, "version 0"),
    ("version-1.1", with_byte(VALID, 11, 1), {}, MalformedUpload, 11, "version 1.1"),
    ("header-too-long", craft(LONG_HEADER, version=(2, 0)), {}, MalformedUpload, 15, "header length 70"),
    ("header-empty", craft(""), {}, MalformedUpload, 13, "not a Python literal"),
    ("header-not-literal", craft(header_text() + "junk"), {}, MalformedUpload, None, "not a Python literal"),
    ("header-call", craft("dict(descr='<f4')"), {}, MalformedUpload, None, "not a Python literal"),
    ("header-python2-long", craft(header_text(shape="(2L,)")), {}, MalformedUpload, None, "not a Python literal"),
    ("header-deep", craft("-" * 20_000 + "1"), {}, MalformedUpload, None, "not a Python literal"),
    ("header-huge-int", craft(header_text(shape="(" + "9" * 5000 + ",)")), {}, MalformedUpload, None, "literal"),
    ("header-backslash", craft(header_text(descr="'\\x3cf4'")), {}, MalformedUpload, None, "backslash"),
    ("header-unhashable-key", craft("{[1]: 2}"), {}, MalformedUpload, None, "not a Python literal"),
    ("header-not-dict", craft("[1, 2]"), {}, MalformedUpload, None, "not a dict"),
    ("header-missing-key", craft("{'descr': '<f4', 'shape': (2,)}"), {}, MalformedUpload, None, "keys"),
    ("header-extra-key", craft(header_text()[:-2] + "'x': 1}"), {}, MalformedUpload, None, "keys"),
    ("shape-list", craft(header_text(shape="[2]")), {}, MalformedUpload, None, "shape"),
    ("shape-negative", craft(header_text(shape="(-1,)")), {}, MalformedUpload, None, "shape"),
    ("shape-bool", craft(header_text(shape="(True,)")), {}, MalformedUpload, None, "shape"),
    ("shape-float", craft(header_text(shape="(2.0,)")), {}, MalformedUpload, None, "shape"),
    ("shape-65-dims", craft(header_text(shape="(" + "1, " * 65 + ")")), {}, MalformedUpload, None, "dimensions"),
    ("shape-unrepresentable", craft(header_text(shape=f"(0, {2**62}, 4)")), {}, MalformedUpload, None, "too large"),
    ("fortran-int", craft(header_text(fortran="0")), {}, MalformedUpload, None, "fortran_order"),
    ("descr-unknown", craft(header_text(descr="'zz9'")), {}, MalformedUpload, None, "descr"),
    ("descr-int", craft(header_text(descr="5")), {}, MalformedUpload, None, "descr"),
    ("dtype-int32", encode_local_result(1, np.arange(3, dtype="<i4")), {}, UnacceptableWeights, None, "<i4"),
    ("dtype-bool", encode_local_result(1, np.ones(3, dtype=bool)), {}, UnacceptableWeights, None, "|b1"),
    ("dtype-complex", encode_local_result(1, np.ones(3, dtype="<c8")), {}, UnacceptableWeights, None, "<c8"),
    ("dtype-string", encode_local_result(1, np.array(["ab"])), {}, UnacceptableWeights, None, "<U2"),
    ("dtype-bytes", encode_local_result(1, np.array([b"ab"])), {}, UnacceptableWeights, None, "|S2"),
    ("dtype-datetime", encode_local_result(1, np.zeros(2, "<M8[s]")), {}, UnacceptableWeights, None, "M8"),
    ("dtype-object", craft(header_text(descr="'|O'")), {}, UnacceptableWeights, None, "|O"),
    ("dtype-structured", encode_local_result(1, np.zeros(2, [("a", "<f4")])), {}, UnacceptableWeights, None, "'a'"),
    ("dtype-subarray", craft(header_text(descr="[('a', '<f4', (2,))]")), {}, UnacceptableWeights, None, "'a'"),
    ("dtype-longdouble", craft(header_text(descr=repr(LONGDOUBLE))), {}, UnacceptableWeights, None, LONGDOUBLE),
    ("shape-unexpected", VALID, {"expected_shape": (2, 3)}, UnacceptableWeights, None, "shape (6,)"),
    ("shape-not-empty", EMPTY, {"expected_shape": (1, 4)}, UnacceptableWeights, None, "(0, 4)"),
    ("declared-too-large", VALID, {"max_bytes": len(VALID) - 1}, UploadTooLarge, None, str(len(VALID))),
    ("declared-huge", craft(header_text(shape=f"({2**70},)")), {}, UploadTooLarge, None, "limit"),
    ("header-alone-too-large", VALID, {"max_bytes": 50}, UploadTooLarge, 13, "limit is 50"),
    ("fed-too-much", VALID, {"max_bytes": 8}, UploadTooLarge, 8, "limit of 8"),
    ("nan-f2", F2_NAN, {}, UnacceptableWeights, last(F2_NAN) - 2, "nan at element 1"),
    ("inf-f2-big-endian", F2_BE_INF, {}, UnacceptableWeights, last(F2_BE_INF) - 4, "-inf at element 0"),
    ("nan-f8-first", nonfinite_f8(0, np.nan), {}, UnacceptableWeights, F8_OFFSET + 7, "nan at element 0"),
    ("inf-f8", nonfinite_f8(1, np.inf), {}, UnacceptableWeights, F8_OFFSET + 15, "inf at element 1"),
    ("minus-inf-f8-last", nonfinite_f8(2, -np.inf), {}, UnacceptableWeights, F8_OFFSET + 23, "-inf at element 2"),
    ("trailing", VALID + b"\x00", {}, MalformedUpload, len(VALID), "trailing"),
    ("trailing-at-limit", VALID + b"\x00", {"max_bytes": len(VALID)}, MalformedUpload, len(VALID), "trailing"),
    ("trailing-after-empty", EMPTY + b"\x00", {}, MalformedUpload, len(EMPTY), "trailing"),
]


@pytest.mark.parametrize(
    "upload, kwargs, kind, index, words", [case[1:] for case in REFUSAL_CASES], ids=[case[0] for case in REFUSAL_CASES]
)
def test_refusal(upload, kwargs, kind, index, words):
    where, refusal = refusal_point(upload, **kwargs)
    assert type(refusal) is kind
    assert words in refusal.message and str(refusal) == refusal.message
    if index is None:  # a header problem: visible with the header's last byte, not before
        index = header_end(upload) - 1
    assert where == index, refusal.message
    # The same refusal, whatever the chunking: the bytes before `where` never raise.
    parser = LocalResultParser(**{"max_bytes": BIG, **kwargs})
    parser.feed(upload[:where])
    for chunks in ([upload], split(upload, [where]), split(upload, [where // 2, where + 1])):
        assert type(run(chunks, **kwargs)) is kind


def header_end(upload: bytes) -> int:
    """Where the .npy header of a crafted or encoded upload ends (its data offset)."""
    field = 2 if upload[10] == 1 else 4
    return 12 + field + int.from_bytes(upload[12 : 12 + field], "little")


# Texts that sit on the edge of Python's tokenizer: whitespace it does not
# take (U+00A0, U+0085, \v, the separators \x1c-\x1f), line ends and NUL in
# strings, leading zeros; and their neighbours that it does take.
LITERAL_EDGES = [
    *(f"{{'a':{space}1}}" for space in " \t\n\r\f\v\x1c\x1d\x1e\x1f\x85\xa0"),
    *(f"{{'a': 1}}{space}" for space in " \t\n\r\f\v\x85\xa0"),
    *(f"{space}{{'a': 1}}" for space in " \t\n\f\v\xa0"),
    "{'a\nb': 1}", "{'a\rb': 1}", "{'a\x00b': 1}", "{'a\xa0b': 1}", '{"a\nb": 1}',
    "(01,)", "(00,)", "(0,)", "(-0,)", "(10,)", "(-01,)", "(0, 001)",
]


@pytest.mark.parametrize("text", LITERAL_EDGES, ids=[ascii(text) for text in LITERAL_EDGES])
def test_header_literals_are_parsed_as_python_parses_them(text):
    """What numpy's `ast.literal_eval` refuses is refused; what it reads is read the same."""
    try:
        expected = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        with pytest.raises(ValueError):
            wire.parse_literal(text)
        return
    assert wire.parse_literal(text) == expected


def test_refusal_statuses():
    assert [http_status(refusal("x")) for refusal in (MalformedUpload, UploadTooLarge, UnacceptableWeights)] == [400, 413, 422]
    assert all(issubclass(kind, UploadRefused) for kind in REFUSALS)


def test_a_refusal_is_final():
    parser = LocalResultParser(max_bytes=BIG)
    parser.feed(VALID[:4])
    with pytest.raises(MalformedUpload) as first:
        parser.feed(b"\x93NOPE")
    for attempt in (lambda: parser.feed(b""), lambda: parser.feed(VALID[4:]), parser.finish):
        with pytest.raises(MalformedUpload) as again:
            attempt()
        assert again.value is first.value
    assert parser.header is None and parser.error is first.value


def test_incomplete_at_finish_is_final_too():
    parser = LocalResultParser(max_bytes=BIG)
    parser.feed(VALID[:-3])
    with pytest.raises(MalformedUpload, match="incomplete") as first:
        parser.finish()
    with pytest.raises(MalformedUpload) as again:
        parser.feed(VALID[-3:])
    assert again.value is first.value


def test_too_large_is_refused_before_any_data():
    weights = np.zeros(10**6, dtype="<f8")
    data = encode_local_result(1, weights)
    offset = len(data) - weights.nbytes
    parser = LocalResultParser(max_bytes=10**6)
    with pytest.raises(UploadTooLarge, match=f"announces {len(data)} bytes"):
        parser.feed(data[:offset])  # header only: no data byte yet
    assert parser.received == offset


def test_expected_shape_accepts_matching_and_empty_when_expected():
    assert run([VALID], expected_shape=(6,)).shape == (6,)
    assert run([EMPTY], expected_shape=(0, 4)).shape == (0, 4)
    assert run([EMPTY]).shape == (0, 4)  # no expectation: well-formed, the caller decides
    scalar = encode_local_result(2, np.float32(1.5))
    assert parse_local_result(scalar, expected_shape=())[1] == np.float32(1.5)


def test_parse_local_result_refuses_like_the_parser():
    for _, upload, kwargs, kind, _, _ in REFUSAL_CASES:
        with pytest.raises(kind):
            parse_local_result(upload, **kwargs)


# -- memory ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 100_003], ids=["whole", "odd-chunks"])
def test_parser_memory_does_not_grow_with_the_upload(chunk):
    data = encode_local_result(1, np.ones(4 * 2**20, dtype="<f4"))  # 16 MiB
    chunks = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    views = [memoryview(c) for c in chunks]
    parser = LocalResultParser(max_bytes=BIG)
    tracemalloc.start()
    try:
        for view in views:
            parser.feed(view)
        parser.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak  # the data are 16 MiB
    assert len(parser._partial) < 4


# -- stored uploads --------------------------------------------------------------

STORED = [
    encode_local_result(0, np.arange(6, dtype="<f4")),
    encode_local_result(2**32 - 1, np.asfortranarray(np.ones((3, 5), dtype=">f8"))),
    encode_local_result(5, np.float16(2.5)),
    encode_local_result(5, np.zeros((0, 3), dtype="<f2")),
]


@pytest.mark.parametrize("data", STORED, ids=range(len(STORED)))
@pytest.mark.parametrize("buffering", [0, -1], ids=["raw", "buffered"])
def test_read_local_result_header_from_a_file(tmp_path, data, buffering):
    path = tmp_path / "upload"
    path.write_bytes(data)
    with open(path, "rb", buffering=buffering) as stream:
        header = read_local_result_header(stream)
        assert header == run([data])
        assert stream.tell() == header.data_offset
        assert stream.read() == data[header.data_offset :]


class Trickle(io.RawIOBase):
    """A stream answering at most 3 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._inner.read(min(3, len(buffer)))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def tell(self) -> int:
        return self._inner.tell()


def test_read_local_result_header_with_short_reads_and_format_2_0():
    stream = io.BytesIO()
    stream.write((4).to_bytes(4, "big"))
    np.lib.format.write_array(stream, np.ones((2, 2), "<f4"), version=(2, 0))
    data = stream.getvalue()
    trickle = Trickle(data)
    header = read_local_result_header(trickle)
    assert header == run([data]) and trickle.tell() == header.data_offset


def test_read_local_result_header_refuses_truncated_and_oversized():
    with pytest.raises(MalformedUpload, match="incomplete"):
        read_local_result_header(io.BytesIO(VALID[:40]))
    with pytest.raises(UploadTooLarge):
        read_local_result_header(io.BytesIO(VALID), max_bytes=100)
    stream = io.BytesIO(VALID[:VALID_OFFSET])  # the data need not be there: only the header is read
    assert read_local_result_header(stream).data_offset == VALID_OFFSET


# -- properties -------------------------------------------------------------------

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_weights = hnp.arrays(
    dtype=hnp.floating_dtypes(sizes=(16, 32, 64), endianness="?"),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
    elements={"allow_nan": False, "allow_infinity": False},
)


@st.composite
def uploads(draw):
    weights = draw(finite_weights)
    if draw(st.booleans()):
        weights = np.asfortranarray(weights)
    samples = draw(st.integers(0, 2**32 - 1))
    return samples, weights, encode_local_result(samples, weights)


@st.composite
def chunked(draw, data: bytes) -> list[bytes]:
    if draw(st.integers(0, 9)) == 0:
        return [data[i : i + 1] for i in range(len(data))]
    return split(data, draw(st.lists(st.integers(0, len(data)), max_size=8)))


@given(upload=uploads(), data=st.data())
@FAST
def test_valid_uploads_round_trip_in_any_chunking(upload, data):
    samples, weights, encoded = upload
    chunks = data.draw(chunked(encoded))
    header = run(chunks)
    assert isinstance(header, LocalResultHeader), header
    assert header == run([encoded]) and header.samples == samples and header.total_bytes == len(encoded)
    got_samples, got = parse_local_result(encoded, max_bytes=len(encoded), expected_shape=weights.shape)
    assert got_samples == samples and got.dtype == weights.dtype and got.shape == weights.shape
    assert np.array_equal(got, weights) and got.tobytes() == weights.tobytes()


def check_outcome(upload: bytes, chunks: list[bytes], **kwargs) -> None:
    """Either exactly what numpy reads from the bytes, or an UploadRefused; the same however chunked."""
    kwargs.setdefault("max_bytes", BIG)
    assert b"".join(chunks) == upload
    whole, pieces = run([upload], **kwargs), run(chunks, **kwargs)
    assert type(whole) is type(pieces)
    if isinstance(whole, UploadRefused):
        assert type(whole) in REFUSALS and whole.message and type(whole.message) is str
        with pytest.raises(type(whole)):
            parse_local_result(upload, **kwargs)
        return
    assert whole == pieces
    assert whole.total_bytes == len(upload) <= kwargs["max_bytes"]
    assert whole.samples == int.from_bytes(upload[:SAMPLES_BYTES], "big")
    loaded = np.load(io.BytesIO(upload[SAMPLES_BYTES:]), allow_pickle=False, max_header_size=2**17)
    assert loaded.dtype == whole.dtype and loaded.shape == whole.shape
    assert loaded.dtype.type in (np.float16, np.float32, np.float64) and np.isfinite(loaded).all()
    if kwargs.get("expected_shape") is not None:
        assert loaded.shape == kwargs["expected_shape"]
    samples, got = parse_local_result(upload, **kwargs)
    assert samples == whole.samples and got.dtype == loaded.dtype and got.shape == loaded.shape
    assert np.array_equal(got, loaded) and got.tobytes() == loaded.tobytes()


@given(upload=st.binary(max_size=300), data=st.data())
@FAST
def test_arbitrary_bytes_are_refused_or_exactly_numpy(upload, data):
    check_outcome(upload, data.draw(chunked(upload)))


@given(tail=st.binary(max_size=200), version=st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x01\x01"]), data=st.data())
@FAST
def test_arbitrary_bytes_after_a_valid_magic(tail, version, data):
    upload = b"\x00\x00\x00\x07\x93NUMPY" + version + tail
    check_outcome(upload, data.draw(chunked(upload)))


header_values = st.fixed_dictionaries(
    {
        "descr": st.one_of(
            st.sampled_from(["<f4", ">f8", "<f2", "|f2", "f4", "float32", "<i4", "|O", "|b1", "<c8", "<U3", "x", "<f16"]),
            st.just([("a", "<f4")]),
            st.integers(),
        ),
        "fortran_order": st.sampled_from([True, False, 0, 1, "no"]),
        "shape": st.one_of(
            st.tuples(), st.lists(st.integers(-2, 6), max_size=4).map(tuple), st.lists(st.integers(0, 3), max_size=3)
        ),
    },
    optional={"extra": st.integers()},
)


@st.composite
def mutated(draw):
    _, weights, upload = draw(uploads())
    data = bytearray(upload)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate", "nonfinite", "header"]))
        at = draw(st.integers(0, len(data)))
        if kind == "set" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "nonfinite" and weights.size:
            size = weights.dtype.itemsize
            bad = np.array([draw(st.sampled_from([np.nan, np.inf, -np.inf]))], weights.dtype).tobytes()
            element = draw(st.integers(0, weights.size - 1))
            start = len(upload) - weights.nbytes + element * size
            data[start : start + size] = bad
        elif kind == "header":  # a different header before the original data
            text = repr(draw(header_values)).encode("latin1") + b"\n"
            version = draw(st.sampled_from([1, 2]))
            field = len(text).to_bytes(2 if version == 1 else 4, "little")
            data = bytearray(upload[:10] + bytes([version, 0]) + field + text + upload[len(upload) - weights.nbytes :])
    return bytes(data)


@given(upload=mutated(), data=st.data(), limit=st.one_of(st.none(), st.integers(0, 400)), shape=st.sampled_from([None, (), (2,), (0,)]))
@settings(FAST, max_examples=300)
def test_mutated_uploads_are_refused_or_exactly_numpy(upload, data, limit, shape):
    kwargs = {"expected_shape": shape}
    if limit is not None:
        kwargs["max_bytes"] = limit
    check_outcome(upload, data.draw(chunked(upload)), **kwargs)


@settings(max_examples=60, deadline=None)
@given(
    weights=hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=40), elements=st.floats(-1e3, 1e3, width=32)),
    samples=st.integers(0, 2**32 - 1),
    read_sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8),
)
def test_an_upload_body_read_in_any_steps_is_the_encoded_local_result(weights, samples, read_sizes):
    from xaind.sdk.http import ArrayBody

    body = ArrayBody(samples, weights)
    expected = encode_local_result(samples, weights)
    assert body.length == len(expected)
    pieces = []
    for step in range(len(expected) + 1):  # bounded: every read but the last returns >= 1 byte
        piece = body.read(read_sizes[step % len(read_sizes)])
        assert isinstance(piece, bytes)
        if not piece:
            break
        pieces.append(piece)
    assert b"".join(pieces) == expected
    body.seek(0)
    assert body.read() == expected
