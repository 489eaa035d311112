"""SmolVLM2 for streaming: loading (hub id | local dir | offline default | random-init) and the two
operations the stream needs: encode frames into image features, and run the language model on a chunk
of tokens at explicit positions on top of a KV cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from prospect.cache import KIND, PositionedCache, Provenance, crop_end
from prospect.models.architectures import ARCHITECTURES, OFFLINE_VISION, Architecture, smolvlm_config
from prospect.models.chat_format import (
    CHAT_FORMATS,
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    IMAGE_TOKEN,
    SMOLVLM_ADDED_TOKENS,
    ChatFormat,
)
from prospect.models.offline import ModelUnavailable, offline_smollm2_dir, smolvlm_tokenizer_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"model.device={device}: CUDA is not available on this machine (use model.device=cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def image_processor_for(arch: Architecture):
    """SmolVLM's image processor (PIL backend: no torchvision) for unsplit frames of `arch`."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil  # lazy: transformers' model code costs seconds, only when a model loads

    size = {"longest_edge": arch.image_size}
    return SmolVLMImageProcessorPil(
        do_image_splitting=False, size=size, max_image_size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


@dataclass
class VisionLanguageModel:
    """A loaded SmolVLM2 with its tokenizer, image processor and prompt format."""

    model: torch.nn.Module  # SmolVLMForConditionalGeneration
    tokenizer: object
    image_processor: object
    chat: ChatFormat
    name: str
    blind: bool = False  # True for the offline default: image features are zero
    stop_at_newline: bool = False  # a reply also ends at any token holding a line break

    def __post_init__(self) -> None:
        self.model.eval()
        self.writing_cache: PositionedCache | None = None  # the cache a forward is filling (query recording)
        vocab = self.tokenizer.get_vocab()
        self.image_token_id = vocab[IMAGE_TOKEN]
        self.stop_ids = [vocab[self.chat.end_of_turn]]
        if self.stop_at_newline:
            self.stop_ids += sorted(
                i for token, i in vocab.items() if "\n" in self.tokenizer.convert_tokens_to_string([token])
            )
        # image placeholders are never generated (a generated <image> would have no features)
        self.suppressed_ids = [vocab[t] for t in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN) if t in vocab]
        if self.chat.end_of_turn not in SMOLVLM_ADDED_TOKENS:  # a ChatML model never saw SmolVLM's added tokens
            self.suppressed_ids = [vocab[t] for t in SMOLVLM_ADDED_TOKENS if t in vocab]
        if self.image_token_id != self.model.config.image_token_id:
            raise ModelUnavailable(
                f"{self.name}: tokenizer <image> id {self.image_token_id} != model image_token_id {self.model.config.image_token_id}"
            )

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def image_tokens(self) -> int:
        """`<image>` tokens per (unsplit) frame."""
        return int(self.model.model.image_seq_len)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes (keys and values of every layer) in the model's dtype."""
        text = self.model.config.text_config
        return 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * self.dtype.itemsize

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.model.model.text_model.rotary_emb.inv_freq

    def new_cache(self, capacity: int, record_queries: bool = False) -> PositionedCache:
        """An empty KV cache of preallocated buffers for `capacity` tokens; with `record_queries` every layer
        also keeps the pre-RoPE queries of its tokens, written by the forward passes that fill this cache."""
        rope = self.model.model.text_model.rotary_emb
        text = self.model.config.text_config
        width = text.num_attention_heads * text.head_dim if record_queries else None
        cache = PositionedCache(capacity, inv_freq=rope.inv_freq, attention_scaling=float(rope.attention_scaling), query_width=width)
        if record_queries:
            self._install_query_hooks()
            self.allocate(cache)  # the query hooks run before a layer's first write
        return cache

    def allocate(self, cache: PositionedCache) -> None:
        """Create every layer's buffers now (they are otherwise made at the layer's first write)."""
        text = self.model.config.text_config
        empty = torch.zeros(1, text.num_key_value_heads, 0, text.head_dim, device=self.device, dtype=self.dtype)
        for layer_index in range(text.num_hidden_layers):
            if layer_index >= len(cache.layers) or not cache.layers[layer_index].is_initialized:
                cache.update(empty, empty, layer_index)

    def _install_query_hooks(self) -> None:
        """Hooks on each layer's query projection: they hand its output (pre-RoPE queries) to the cache being
        filled (`writing_cache.write_queries`), which keeps them if it records queries. They also run inside
        CUDA-graph capture, so replays record too."""
        if getattr(self, "_query_hooks", None) is not None:
            return

        def hook(layer_index: int):
            def write(module, inputs, output):
                if self.writing_cache is not None:
                    self.writing_cache.write_queries(layer_index, output)

            return write

        layers = self.model.model.text_model.layers
        self._query_hooks = [layer.self_attn.q_proj.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_labeled(self, pieces: Sequence[tuple[str, int, int]]) -> tuple[list[int], Provenance]:
        """Token ids of the concatenated texts (tokenized as one string, so ids equal `encode` of the whole)
        and each token's provenance: the kind and frame of the piece its first character falls in, with
        `<image>` tokens of a frame piece labelled `image` and numbered (patch index) in order.

        pieces: (text, kind code, frame stream index or -1)."""
        text = "".join(piece for piece, _, _ in pieces)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        ends, total = [], 0
        for piece, _, _ in pieces:
            total += len(piece)
            ends.append(total)
        kinds, frames, patches = [], [], []
        piece_index, patch = 0, {}
        for token, (start, _) in zip(ids, encoded["offset_mapping"]):
            while piece_index < len(pieces) - 1 and start >= ends[piece_index]:
                piece_index += 1
            _, kind, frame = pieces[piece_index]
            if token == self.image_token_id and frame >= 0:
                kinds.append(KIND["image"])
                patches.append(patch.get(frame, 0))
                patch[frame] = patches[-1] + 1
            else:
                kinds.append(kind)
                patches.append(-1)
            frames.append(frame)
        return ids, Provenance(
            torch.tensor(kinds, dtype=torch.int8), torch.tensor(frames, dtype=torch.long), torch.tensor(patches, dtype=torch.long)
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        """Image features of frames, [n, image_tokens, hidden], in one vision-tower batch."""
        pixels, mask = self.pixel_values(images)
        if mask is None:
            return self.encode_whole_frames(pixels[:, 0])
        output = self.model.model.get_image_features(pixels, mask, return_dict=True)
        return torch.stack(list(output.pooler_output))

    @torch.no_grad()
    def encode_whole_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features [n, image_tokens, hidden] of n normalised frames [n, 3, size, size] of the tower's own
        size: SmolVLM's get_image_features for images without padding, whose patches are all real, without its
        host reads (which images are padding, how many per sample, whether the attention mask is all true), so a
        batch of frames costs no device sync. The vision model's steps are called one by one: with every patch
        real, its encoder attends without a mask (under SDPA its own forward drops the all-true mask after reading
        it; under eager attention the mask it would add is all zeros, which changes no score)."""
        vision = self.model.model.vision_model
        patches = pixels.shape[-1] // vision.config.patch_size
        patch_mask = torch.ones(pixels.shape[0], patches, patches, dtype=torch.bool, device=pixels.device)
        hidden = vision.embeddings(pixel_values=pixels, patch_attention_mask=patch_mask)
        hidden = vision.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return self.model.model.connector(vision.post_layernorm(hidden))

    def pixel_values(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[n, 1, 3, size, size] pixels as SmolVLM's image processor makes them for unsplit frames. Frames that
        are already size x size RGB (ProAssist's 384 px frames for the 2.2B model) skip the processor: its resize
        is then the identity and the rest (x / 255 - 0.5) / 0.5 runs on the model's device."""
        size = self.model.config.vision_config.image_size
        if all(getattr(image, "mode", None) == "RGB" and image.size == (size, size) for image in images):
            array = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
            pixels = array.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            pixels = (pixels / 255.0 - 0.5) / 0.5
            return pixels.to(self.dtype)[:, None], None
        inputs = self.image_processor(images=[[image] for image in images], return_tensors="pt", do_image_splitting=False)
        return inputs["pixel_values"].to(self.device, self.dtype), inputs["pixel_attention_mask"].to(self.device)

    @torch.no_grad()
    def embed(self, input_ids: Sequence[int], image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings [1, n, hidden]; `<image>` tokens take the rows of `image_features` in order."""
        ids = list(input_ids)
        embeds = self.model.get_input_embeddings()(torch.tensor([ids], device=self.device))
        slots = [i for i, token in enumerate(ids) if token == self.image_token_id]  # found here: no device sync
        rows = image_features.reshape(-1, embeds.shape[-1]) if image_features is not None else None
        if slots or rows is not None:
            if rows is None or rows.shape[0] != len(slots):
                raise ValueError(f"{len(slots)} <image> tokens but {0 if rows is None else rows.shape[0]} image feature rows")
            embeds[0, torch.tensor(slots, device=self.device)] = rows.to(embeds.dtype)
        return embeds

    @torch.no_grad()
    def forward(
        self,
        input_ids: Sequence[int],
        cache: PositionedCache,
        image_features: torch.Tensor | None = None,
        all_logits: bool = False,
        provenance: Provenance | None = None,
        append: bool = True,
    ) -> torch.Tensor:
        """Append `input_ids` to the cache at positions cache.next_position.. and return float32 logits
        of the last token ([vocab]) or of every token ([n, vocab]). `<image>` tokens take the rows of
        `image_features` in order; `provenance` labels the new tokens (unknown if None). Attention covers
        the cached tokens only (the eager step). append=False computes the same logits and removes the
        chunk again (crop_end), leaving the cache as it was."""
        embeds = self.embed(input_ids, image_features)
        length = cache.get_seq_length()
        positions = cache.take_positions(embeds.shape[1], provenance).to(self.device)
        cache.write_slots = torch.arange(length, length + embeds.shape[1], device=self.device)
        self.writing_cache = cache
        try:
            hidden = self.model.model.text_model(
                inputs_embeds=embeds, position_ids=positions[None], past_key_values=cache, use_cache=True
            ).last_hidden_state
        finally:
            self.writing_cache = None
        hidden = hidden[0] if all_logits else hidden[0, -1]
        logits = self.model.lm_head(hidden).float()
        if not append:
            crop_end(cache, embeds.shape[1])
        return logits


def load_model(model_cfg: DictConfig, cache_dir: str | Path, seed: int = 0) -> VisionLanguageModel:
    """Load the model of a `model` config group (see conf/model/*.yaml)."""
    device = resolve_device(str(model_cfg.device))
    dtype = resolve_dtype(str(model_cfg.dtype), device)
    chat = CHAT_FORMATS[model_cfg.chat_format]
    from transformers import AutoTokenizer, SmolVLMForConditionalGeneration  # lazy: transformers' model code costs seconds, only when a model loads

    if model_cfg.get("gguf_file"):
        folder = offline_smollm2_dir(cache_dir, model_cfg.gguf_package, model_cfg.gguf_file)
        model = SmolVLMForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).to(device)
        log.warning("%s: language weights are real but the model is BLIND TO PIXELS (untrained vision, zero connector)", model_cfg.name)
        arch = replace(ARCHITECTURES[model_cfg.architecture], **OFFLINE_VISION)
        return VisionLanguageModel(
            model, AutoTokenizer.from_pretrained(str(folder)), image_processor_for(arch), chat, model_cfg.name, blind=True,
            stop_at_newline=bool(model_cfg.get("stop_at_newline", False)),
        )
    if model_cfg.random_init:
        arch = ARCHITECTURES[model_cfg.architecture]
        tokenizer = AutoTokenizer.from_pretrained(str(smolvlm_tokenizer_dir(cache_dir)))
        torch.manual_seed(seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = SmolVLMForConditionalGeneration(smolvlm_config(arch))
        finally:
            torch.set_default_dtype(default_dtype)
        log.info("%s: real %s architecture with random weights", model_cfg.name, model_cfg.architecture)
        return VisionLanguageModel(
            model, tokenizer, image_processor_for(arch), chat, model_cfg.name,
            stop_at_newline=bool(model_cfg.get("stop_at_newline", False)),
        )
    return _load_pretrained(model_cfg, device, dtype, chat)


def _load_pretrained(model_cfg: DictConfig, device: torch.device, dtype: torch.dtype, chat: ChatFormat) -> VisionLanguageModel:
    from transformers import AutoModelForImageTextToText, AutoTokenizer  # lazy, with the next: transformers' model code costs seconds, only when a model loads
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    source = str(Path(model_cfg.path).expanduser()) if model_cfg.get("path") else model_cfg.hub_id
    key = "model.path" if model_cfg.get("path") else "model.hub_id"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = SmolVLMImageProcessorPil.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(device)
    except ImportError as error:
        raise ModelUnavailable(f"{key}={source}: a package is missing ({error}); install it with pip") from None
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = "download it on a machine with network (hf download {0}) and set model.path=DIR".format(source)
        raise ModelUnavailable(
            f"{key}={source}: cannot load ({'HF_HUB_OFFLINE is set and it is not in the local cache' if offline else str(error).splitlines()[0]}); {hint}"
        ) from None
    if model.config.model_type != "smolvlm":
        raise ModelUnavailable(f"{key}={source}: model_type {model.config.model_type!r} is not smolvlm")
    return VisionLanguageModel(
        model, tokenizer, image_processor, chat, model_cfg.name, stop_at_newline=bool(model_cfg.get("stop_at_newline", False))
    )
