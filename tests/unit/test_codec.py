import pytest
from pydantic import TypeAdapter

from schemas.events import InferenceRequest
from streams import DecodeError
from streams.codec import decode, encode
from streams.deadletter import decode_or_dead_letter
from streams.sink import MemoryEventSink
from streams.topics import DLQ
from tests.builders import make_request, malformed_requests, request_json

ADAPTER = TypeAdapter(InferenceRequest)


def test_codec_round_trip_is_identity():
    request = make_request(session_key="s-1", images=["aGk="])
    assert decode(encode(request), ADAPTER) == request


@pytest.mark.parametrize(("reason", "raw"), malformed_requests(9),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_decode_malformed_record_gives_readable_reason(reason, raw):
    with pytest.raises(DecodeError) as caught:
        decode(raw, ADAPTER)
    assert reason in caught.value.reason


def test_decode_null_value_is_rejected():
    with pytest.raises(DecodeError, match="empty record"):
        decode(None, ADAPTER)


async def test_dead_letter_records_reason_and_origin():
    sink = MemoryEventSink()
    got = await decode_or_dead_letter(sink, ADAPTER, raw=b"{nope", key=b"acme",
                                      topic="tw.requests", partition=2, offset=17,
                                      consumer="passthrough")
    assert got is None
    [letter] = sink.on(DLQ)
    from schemas.events import DeadLetter

    dead = DeadLetter.model_validate_json(letter.value)
    assert (dead.origin_topic, dead.origin_partition, dead.origin_offset) == ("tw.requests", 2, 17)
    assert dead.raw == b"{nope"
    assert dead.reason.startswith("invalid JSON")


async def test_good_record_passes_without_dead_letter():
    sink = MemoryEventSink()
    got = await decode_or_dead_letter(sink, ADAPTER, raw=request_json(), key=None,
                                      topic="tw.requests", partition=0, offset=0, consumer="x")
    assert got is not None and got.tenant == "acme"
    assert sink.records == []
