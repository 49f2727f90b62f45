"""Text prompts for imported models: tokenizer.json through the ``tokenizers`` package, the
chat template rendered as transformers renders it, ``ec2moe generate --hf --prompt``.
The tokenizer is trained in the test with ``tokenizers`` itself (no hub)."""

import json
import os
import shutil

import jax.numpy as jnp
import pytest

from ec2moe_jax import cli
from ec2moe_jax.models import generate, load_hf
from ec2moe_jax.models.hf_tokenizer import load_tokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "the cat sat on the mat and the dog sat on the log while the bird sang a song " * 4


def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[
        "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator([TEXT], trainer)
    assert tok.get_vocab_size() <= vocab_size
    return tok.to_str()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The Qwen3-MoE fixture (vocab 96) with a trained tokenizer and a ChatML template."""
    dst = tmp_path_factory.mktemp("tok") / "qwen3_moe"
    shutil.copytree(os.path.join(FIX, "qwen3_moe"), dst)
    (dst / "tokenizer.json").write_text(_tokenizer_json(96))
    json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>",
               "bos_token": None, "tokenizer_class": "PreTrainedTokenizerFast"},
              open(dst / "tokenizer_config.json", "w"))
    return str(dst)


def test_chat_template_renders_around_the_prompt(folder):
    tok = load_tokenizer(folder)
    ids = tok.encode("the cat")
    expected = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok.tokenizer.encode(expected, add_special_tokens=False).ids
    assert ids[0] == tok.tokenizer.token_to_id("<|im_start|>")
    assert tok.encode("the cat", chat=False) == tok.tokenizer.encode("the cat").ids
    assert tok.eos_ids == (tok.tokenizer.token_to_id("<|im_end|>"),)
    # Decoding stops at the end of the turn.
    cat = tok.tokenizer.encode("the cat", add_special_tokens=False).ids
    assert tok.decode(cat + list(tok.eos_ids) + cat) == "the cat"


def test_template_list_form_and_errors(folder, tmp_path):
    dst = tmp_path / "t"
    shutil.copytree(folder, dst)
    cfg = json.load(open(dst / "tokenizer_config.json"))
    cfg["chat_template"] = [{"name": "tool_use", "template": "x"},
                            {"name": "default", "template": CHATML}]
    json.dump(cfg, open(dst / "tokenizer_config.json", "w"))
    assert load_tokenizer(str(dst)).encode("the cat") == load_tokenizer(folder).encode("the cat")
    cfg["chat_template"] = "{{ raise_exception('no system role') }}"
    json.dump(cfg, open(dst / "tokenizer_config.json", "w"))
    with pytest.raises(ValueError, match="chat template failed to render: no system role"):
        load_tokenizer(str(dst)).encode("x")
    (dst / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(ValueError, match="tokenizer_config.json' is not valid JSON"):
        load_tokenizer(str(dst))
    os.remove(dst / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*--prompt-ids"):
        load_tokenizer(str(dst))


def test_generate_hf_with_a_text_prompt(folder):
    text = cli.run(["generate", "--hf", folder, "--prompt", "the cat", "--max-new-tokens", "5"])
    tok = load_tokenizer(folder)
    model, params = load_hf(folder)
    out = generate(model, params, jnp.asarray([tok.encode("the cat")], jnp.int32), 5)
    assert text == tok.decode(out[0])
    plain = cli.run(["generate", "--hf", folder, "--prompt", "the cat", "--max-new-tokens", "3",
                     "--no-chat-template"])
    out = generate(model, params, jnp.asarray([tok.encode("the cat", chat=False)]), 3)
    assert plain == tok.decode(out[0])


QWEN_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
    "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are "
    "a cat.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role == "
    "'user' %}{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + "
    "'<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- "
    "'<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.torch
@pytest.mark.parametrize("template", [CHATML, QWEN_LIKE], ids=["chatml", "qwen_like"])
def test_chat_ids_equal_transformers(folder, tmp_path, template):
    """Needs transformers: our ids = AutoTokenizer's apply_chat_template ids."""
    from transformers import AutoTokenizer

    dst = tmp_path / "t"
    shutil.copytree(folder, dst)
    cfg = json.load(open(dst / "tokenizer_config.json"))
    json.dump({**cfg, "chat_template": template}, open(dst / "tokenizer_config.json", "w"))
    hf = AutoTokenizer.from_pretrained(str(dst))
    for prompt in ("the cat", " the dog sat  "):
        want = hf.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want  # a BatchEncoding
        assert load_tokenizer(str(dst)).encode(prompt) == list(want)
        assert load_tokenizer(str(dst)).encode(prompt, chat=False) == hf(prompt)["input_ids"]
