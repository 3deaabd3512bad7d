"""Deterministic text and the token-count rule."""
from __future__ import annotations

from pd_launcher.emulator import textgen


def test_count_rule():
    assert textgen.count_tokens("") == 1
    assert textgen.count_tokens("hello") == 2  # hell + o
    assert textgen.count_tokens("Hi, you!") == 4  # Hi , you !
    assert textgen.count_tokens("  a  b\n c ") == 3


def test_text_is_a_function_of_model_prompt_position():
    k1 = textgen.prompt_key("text", "same prompt")
    k2 = textgen.prompt_key("text", "other prompt")
    assert textgen.text("m", k1, 20) == textgen.text("m", k1, 20)
    assert textgen.text("m", k1, 20) != textgen.text("m", k2, 20)
    assert textgen.text("m", k1, 20) != textgen.text("n", k1, 20)
    # a longer completion extends a shorter one (position-wise)
    assert textgen.text("m", k1, 50).startswith(textgen.text("m", k1, 20))
    assert "".join(textgen.tokens("m", k1, 5, 3)) == "".join(textgen.tokens("m", k1, 0, 8)[5:])


def test_generated_text_recounts_to_its_length():
    key = textgen.prompt_key("ids", [1, 2, 3])
    for n in (1, 7, 300):
        assert textgen.count_tokens(textgen.text("demo", key, n)) == n


def test_chat_template_and_keys():
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert textgen.render_chat(msgs) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert textgen.prompt_key("ids", [1, 2]) != textgen.prompt_key("text", "1,2")
