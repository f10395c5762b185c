"""Chat templates: sandboxed rendering of the model's template, and the base-model fallback."""

from __future__ import annotations

import pytest

from appliance.core.errors import APIError
from appliance.core.wire import ChatMessage
from inference.templates import FALLBACK_STOPS, ChatTemplate

MESSAGES = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="Hi <eos>"),
    ChatMessage(role="assistant", content="Hello."),
    ChatMessage(role="user", content=[{"type": "text", "text": "Name a color."}]),
]


def test_fallback_renders_a_transcript_that_ends_with_the_assistant_turn() -> None:
    prompt = ChatTemplate(None).render(MESSAGES)
    assert prompt.text == "Be brief.\n\nUser: Hi <eos>\nAssistant: Hello.\nUser: Name a color.\nAssistant:"
    assert prompt.stops == FALLBACK_STOPS
    assert prompt.add_special and not prompt.parse_special  # user text cannot smuggle control tokens


def test_model_template_is_rendered_with_generation_prompt_and_bos() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    prompt = ChatTemplate(source, bos_token="<s>").render(MESSAGES[:2])
    assert prompt.text == "<s><|system|>Be brief.\n<|user|>Hi <eos>\n<|assistant|>"
    assert prompt.parse_special and not prompt.add_special  # BOS already in the text


def test_template_raise_exception_becomes_a_400() -> None:
    template = ChatTemplate("{{ raise_exception('System role not supported') }}")
    with pytest.raises(APIError) as info:
        template.render(MESSAGES)
    assert info.value.status == 400
    assert "System role not supported" in info.value.message


def test_sandbox_blocks_attribute_escapes() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(APIError):
        template.render(MESSAGES)


def test_tools_reach_the_model_whether_or_not_the_template_renders_them() -> None:
    from appliance.core.wire import Tool

    tool = Tool.model_validate({"type": "function", "function": {"name": "get_weather"}})
    plain = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    text = plain.render(MESSAGES[:2], (tool,)).text
    assert text.startswith("<system>Be brief.\n\nYou can call these functions") and "get_weather" in text
    assert "get_weather" not in plain.render(MESSAGES[:2]).text
    own = ChatTemplate("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                       "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert own.render(MESSAGES[1:2], (tool,)).text == "[get_weather]<user>Hi <eos>"  # its own way, no preamble
    fallback = ChatTemplate(None).render(MESSAGES[1:2], (tool,)).text
    assert "<tool_call>" in fallback and "get_weather" in fallback
