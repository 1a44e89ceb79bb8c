"""The Python package's native module speaks the server's tensor format."""
import math
import struct

import pg_gpt3_client


def test_encode_matches_little_endian_float32():
    values = [1.0, -2.5, 0.1]
    assert pg_gpt3_client.encode_tensor(values) == struct.pack("<3f", *values)


def test_decode_round_trips_and_keeps_special_values():
    data = struct.pack("<4f", 1.5, -0.25, float("-inf"), float("nan"))
    out = pg_gpt3_client.decode_tensor(data)
    assert out[:3] == [1.5, -0.25, float("-inf")]
    assert math.isnan(out[3])


def test_decode_rejects_ragged_bytes():
    try:
        pg_gpt3_client.decode_tensor(b"\x00\x01\x02")
    except ValueError as e:
        assert "multiple of 4" in str(e)
    else:
        raise AssertionError("ragged input must raise ValueError")


def test_default_model():
    assert pg_gpt3_client.DEFAULT_MODEL == "gpt3-125m"
