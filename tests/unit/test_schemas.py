import json

import pytest
from pydantic import TypeAdapter, ValidationError

from schemas.events import (
    ALL_EVENTS,
    MAX_PROMPT_CHARS,
    DeadLetter,
    InferenceRequest,
    Rejection,
    Reply,
)
from schemas.export import export
from tests.builders import make_request, make_result, request_json


def test_request_plain_json_from_any_producer_validates():
    request = InferenceRequest.model_validate_json(request_json(), strict=True)
    assert request.tenant == "acme"
    assert request.reply_topic == "tw.responses"
    assert request.schema_version == 1
    assert len(request.request_id) == 32


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        pytest.param({"tenant": 7}, "valid string", id="wrong-type-tenant"),
        pytest.param({"max_tokens": "7"}, "valid integer", id="no-coercion-str-to-int"),
        pytest.param({"max_tokens": 0}, "greater than or equal", id="max-tokens-zero"),
        pytest.param({"tenant": "a" * 65}, "pattern", id="tenant-too-long"),
        pytest.param({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "at most", id="prompt-oversize"),
        pytest.param({"images": ["aGk="] * 9}, "at most 8", id="too-many-images"),
        pytest.param({"schema_version": 2}, "Input should be 1", id="unknown-version"),
        pytest.param({"surprise": True}, "Extra inputs", id="unknown-field"),
        pytest.param({"prompt": None}, "exactly one", id="neither-prompt-nor-messages"),
        pytest.param({"messages": [{"role": "user", "content": "x"}]}, "exactly one",
                     id="both-prompt-and-messages"),
        pytest.param({"priority": "urgent"}, "Input should be", id="unknown-priority"),
    ],
)
def test_request_invalid_input_rejected(overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        InferenceRequest.model_validate_json(request_json(**overrides), strict=True)


def test_request_chat_messages_render_prompt_text():
    request = make_request(prompt=None, messages=[{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": "hi"}])
    assert request.prompt_text() == "system: be brief\nuser: hi"


def test_reply_union_discriminates_results_and_rejections():
    adapter = TypeAdapter(Reply)
    rejection = Rejection(request_id="r", tenant="t", model="m", reason="rate_limited",
                          retry_after_s=1.5)
    assert adapter.validate_json(rejection.model_dump_json()) == rejection
    result = make_result()
    assert adapter.validate_json(result.model_dump_json()) == result


def test_dead_letter_keeps_raw_bytes_through_json():
    raw = bytes(range(256))
    letter = DeadLetter(raw=raw, key=b"\x00k", reason="bad", origin_topic="tw.requests",
                        origin_partition=3, origin_offset=99, consumer="passthrough")
    back = DeadLetter.model_validate_json(letter.model_dump_json(), strict=True)
    assert back.raw == raw
    assert back.key == b"\x00k"


def test_schemas_export_writes_one_schema_per_event(tmp_path):
    paths = export(tmp_path)
    assert {p.name for p in paths} == {f"{m.__name__}.schema.json" for m in ALL_EVENTS}
    doc = json.loads((tmp_path / "InferenceRequest.schema.json").read_text())
    assert doc["additionalProperties"] is False
    assert "tenant" in doc["required"]
