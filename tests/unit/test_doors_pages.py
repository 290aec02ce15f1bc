"""Page tokens: whatever a client sends back, decoding it is an InvalidArgument or the keys, never a crash."""

import base64
from datetime import UTC, datetime

import pytest

from service.errors import InvalidArgument
from service.store.pages import decode_time, decode_token, encode_token


def token_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_a_token_round_trips_its_keys():
    assert decode_token(encode_token("2026-01-01T00:00:00+00:00", "ds_1"), 2) == ["2026-01-01T00:00:00+00:00", "ds_1"]


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # json.loads would raise RecursionError
        '[["a"], "b"]',
        '[{"a": 1}, "b"]',
        '[1, "b"]',
        '["a\\u0000", "b"]',
        '"ab"',
    ],
)
def test_nested_non_string_or_control_character_keys_are_malformed(text):
    with pytest.raises(InvalidArgument, match="page_token .* is malformed"):
        decode_token(token_of(text), 2)


def test_a_token_longer_than_any_real_one_is_malformed_before_it_is_decoded():
    with pytest.raises(InvalidArgument, match="malformed"):
        decode_token("A" * 10_000, 2)


@pytest.mark.parametrize(
    "value", ["99999-01-01T00:00:00", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00", "yesterday"]
)
def test_a_timestamp_key_out_of_range_is_malformed_not_an_overflow(value):
    token = encode_token(value, "ds_1")
    with pytest.raises(InvalidArgument, match="malformed"):
        decode_time(token, decode_token(token, 2)[0])


def test_a_timestamp_key_is_read_as_utc():
    token = encode_token("2026-01-01T05:00:00+05:00", "ds_1")
    assert decode_time(token, decode_token(token, 2)[0]) == datetime(2026, 1, 1, tzinfo=UTC)
    naive = encode_token("2026-01-01T00:00:00", "ds_1")
    assert decode_time(naive, decode_token(naive, 2)[0]) == datetime(2026, 1, 1, tzinfo=UTC)
