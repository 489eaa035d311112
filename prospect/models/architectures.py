"""SmolVLM2 architectures (docs/offline.md, "Models") as full `SmolVLMConfig`s, for random-init runs and memory maths.

The library's `SmolVLMConfig` defaults are not these models: every field that matters is set here.
Token ids are those of the real SmolVLM2 tokenizer (vocab 49,280; `<image>` = 49190).
"""

from __future__ import annotations

from dataclasses import dataclass

VOCAB_SIZE = 49280
IMAGE_TOKEN_ID = 49190
END_OF_UTTERANCE_ID = 49279


@dataclass(frozen=True)
class Architecture:
    """Sizes of one SmolVLM2 variant. Text = Llama decoder; vision = SigLIP-style encoder."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope_theta: float
    max_positions: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    image_size: int
    patch_size: int
    scale_factor: int
    tie_word_embeddings: bool = False

    @property
    def image_tokens(self) -> int:
        """`<image>` tokens per frame without splitting: (image_size / patch)^2 / scale_factor^2."""
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token in bf16 (keys and values of every layer)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


_SIGLIP_512 = dict(vision_hidden=768, vision_layers=12, vision_heads=12, vision_ffn=3072, image_size=512, patch_size=16, scale_factor=4)

ARCHITECTURES: dict[str, Architecture] = {
    # (*) rope_theta and max positions of the 2.2B model are not verified against the released config.
    "smolvlm2_2b": Architecture(
        hidden=2048, layers=24, heads=32, kv_heads=32, head_dim=64, ffn=8192, rope_theta=273768.0, max_positions=16384,
        vision_hidden=1152, vision_layers=27, vision_heads=16, vision_ffn=4304, image_size=384, patch_size=14, scale_factor=3,
    ),
    "smolvlm2_500m": Architecture(
        hidden=960, layers=32, heads=15, kv_heads=5, head_dim=64, ffn=2560, rope_theta=100000.0, max_positions=8192, **_SIGLIP_512
    ),
    "smolvlm2_256m": Architecture(
        hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, ffn=1536, rope_theta=100000.0, max_positions=8192, **_SIGLIP_512
    ),
    # A few-MB model for tests: real tokenizer ids, 16 image tokens per frame.
    "tiny": Architecture(
        hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128, rope_theta=10000.0, max_positions=16384,
        vision_hidden=32, vision_layers=1, vision_heads=2, vision_ffn=64, image_size=64, patch_size=8, scale_factor=2,
    ),
}

# The offline default's vision tower is untrained and its connector zeroed (it is blind to pixels), so a
# small tower that still yields the 256M model's 64 image tokens per frame replaces the 86M-parameter one.
OFFLINE_VISION = dict(vision_hidden=32, vision_layers=1, vision_heads=2, vision_ffn=64, image_size=128, patch_size=4, scale_factor=4)


def smolvlm_config(arch: Architecture):
    """A transformers `SmolVLMConfig` with every size of `arch` set explicitly."""
    from transformers import SmolVLMConfig  # lazy: transformers costs seconds; the sizes alone need none

    text = dict(
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=arch.hidden,
        intermediate_size=arch.ffn,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        hidden_act="silu",
        max_position_embeddings=arch.max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        tie_word_embeddings=arch.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_ffn,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=3,
    )
    return SmolVLMConfig(
        text_config=text,
        vision_config=vision,
        scale_factor=arch.scale_factor,
        image_token_id=IMAGE_TOKEN_ID,
        tie_word_embeddings=arch.tie_word_embeddings,
        pad_token_id=2,
    )
