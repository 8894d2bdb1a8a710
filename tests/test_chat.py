"""Chat templates (model/chat.py) against transformers' apply_chat_template on the same files."""

from __future__ import annotations

import json
import shutil

import pytest

from raymoe.model.chat import ChatError, ChatTemplate
from raymoe.model.tokenizer import Tokenizer

# Mixtral-8x7B-Instruct-v0.1's template, as its tokenizer_config.json ships it.
MIXTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# A template that uses the rest of what transformers offers templates: system prompts, loops,
# tojson, generation prompts, whitespace control.
RICH = (
    "{%- if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{ bos_token }}{% if system %}<<SYS>>{{ system | tojson }}<</SYS>>\n{% endif %}"
    "{% for m in messages %}\n  {{ m['role'] }}: {{ m['content'] | trim }}{{ eos_token if m['role'] == 'assistant' }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "The cluster sends"}],
    [{"role": "user", "content": "The cluster sends"}, {"role": "assistant", "content": "hello there"},
     {"role": "user", "content": "and 123+456= ünïcode"}],
]


def checkpoint_with(tmp_path, tiny_dir, template: str):
    for f in tiny_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False}))
    return tmp_path


@pytest.mark.parametrize("template", [MIXTRAL_INSTRUCT, RICH], ids=["mixtral-instruct", "rich"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_prompt_ids_equal_transformers(tmp_path, tiny_dir, template, conversation):
    from transformers import AutoTokenizer

    ckpt = checkpoint_with(tmp_path, tiny_dir, template)
    messages = CONVERSATIONS[conversation]
    if template is RICH:
        messages = [{"role": "system", "content": "Be <brief> & exact"}] + messages
    want = AutoTokenizer.from_pretrained(str(ckpt)).apply_chat_template(messages, tokenize=True,
                                                                        add_generation_prompt=True)
    want = want if isinstance(want, list) else list(want["input_ids"])
    got = ChatTemplate.from_dir(ckpt).prompt_ids(Tokenizer(ckpt), messages)
    assert got == want
    assert got[0] == 1 and 2 not in got[:1]  # <s> became its id, not the characters < s >


def test_template_errors_and_absence(tmp_path, tiny_dir):
    assert ChatTemplate.from_dir(tiny_dir) is None  # no tokenizer_config.json
    ckpt = checkpoint_with(tmp_path, tiny_dir, MIXTRAL_INSTRUCT)
    chat = ChatTemplate.from_dir(ckpt)
    with pytest.raises(ChatError, match="roles must alternate"):
        chat.render([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ChatError, match="messages"):
        chat.render([])
    with pytest.raises(ChatError, match=r"messages\[0\]"):
        chat.render(["hi"])


def test_templates_see_no_tools_and_jinja_files_win(tmp_path, tiny_dir):
    """As transformers renders: `tools` and `documents` are None (not undefined), and a
    chat_template.jinja beside the config is the template."""
    ckpt = checkpoint_with(tmp_path, tiny_dir, "{% if tools is not none %}TOOLS{% endif %}{{ messages[0]['content'] }}")
    assert ChatTemplate.from_dir(ckpt).render([{"role": "user", "content": "hi"}]) == "hi"
    (ckpt / "chat_template.jinja").write_text("[{{ messages[0]['content'] }}]")
    assert ChatTemplate.from_dir(ckpt).render([{"role": "user", "content": "hi"}]) == "[hi]"
    (ckpt / "chat_template.jinja").write_text("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(ChatError, match="failed on these messages"):  # a TypeError inside the template
        ChatTemplate.from_dir(ckpt).render([{"role": "user", "content": "hi"}])
