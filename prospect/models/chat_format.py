"""Prompt formats: how turns, frames and replies become text (the format belongs to the model config).

SmolVLM2 (`DEFAULT_CHAT_TEMPLATE` of transformers' SmolVLM processor): the conversation starts with
`<|im_start|>`, turns are `Role: text<end_of_utterance>\\n` with capitalised roles, a reply is
prompted with `Assistant:` and ends at `<end_of_utterance>`. ChatML (SmolLM2-Instruct, the offline
default's language model): `<|im_start|>role\\ntext<|im_end|>\\n`, replies end at `<|im_end|>`.
A frame is a user turn holding `Frame from MM:SS:` and the image tokens of one unsplit image:
`<fake_token_around_image><global-img>` + N x `<image>` + `<fake_token_around_image>`.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
# Tokens the SmolVLM2 tokenizer adds after SmolLM2's 49,152, in id order (49152 .. 49279).
SMOLVLM_ADDED_TOKENS = (
    [GLOBAL_IMAGE_TOKEN]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + [FAKE_IMAGE_TOKEN, IMAGE_TOKEN]
    + [f"<|reserved_special_token_{i}|>" for i in range(88)]
    + [END_OF_UTTERANCE]
)


@dataclass(frozen=True)
class ChatFormat:
    """Text pieces of one prompt format. `{role}` / `{text}` are filled in by the methods."""

    name: str
    stream_start: str  # once, at the start of the context
    turn: str  # a text turn: "{role}" and "{text}"
    roles: dict[str, str]
    frame_turn: str  # "{frame}" = "Frame from MM:SS:" + image tokens
    assistant_prompt: str  # asks the model for a reply
    end_of_turn: str  # the stop token: ends a reply
    after_turn: str = "\n"  # follows end_of_turn

    def text_turn(self, role: str, text: str) -> str:
        return self.turn.format(role=self.roles[role], text=text)

    def frame(self, image_tokens: int, time_s: float) -> str:
        seconds = int(time_s)
        image = FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * image_tokens + FAKE_IMAGE_TOKEN
        return self.frame_turn.format(frame=f"Frame from {seconds // 60:02d}:{seconds % 60:02d}:{image}")

    def reply_text(self, text: str) -> str:
        """What follows the assistant prompt when the assistant says `text`, up to its end of turn (SmolVLM2:
        " " + text; ChatML: text): the tokens a reply of `text` would be generated as."""
        turn = self.text_turn("assistant", text)
        if not (turn.startswith(self.assistant_prompt) and turn.endswith(self.turn_closing)):
            raise ValueError(f"chat format {self.name}: an assistant turn does not begin with its assistant prompt")
        return turn[len(self.assistant_prompt) : len(turn) - len(self.turn_closing)]

    @property
    def turn_closing(self) -> str:
        """What closes a reply in the context: the stop token and the newline after it."""
        return self.end_of_turn + self.after_turn


SMOLVLM = ChatFormat(
    name="smolvlm",
    stream_start="<|im_start|>",
    turn="{role}: {text}" + END_OF_UTTERANCE + "\n",
    roles={"system": "System", "user": "User", "assistant": "Assistant"},
    frame_turn="User: {frame}" + END_OF_UTTERANCE + "\n",
    assistant_prompt="Assistant:",
    end_of_turn=END_OF_UTTERANCE,
)

CHATML = ChatFormat(
    name="chatml",
    stream_start="",
    turn="<|im_start|>{role}\n{text}<|im_end|>\n",
    roles={"system": "system", "user": "user", "assistant": "assistant"},
    frame_turn="<|im_start|>user\n{frame}<|im_end|>\n",
    assistant_prompt="<|im_start|>assistant\n",
    end_of_turn="<|im_end|>",
)

CHAT_FORMATS = {f.name: f for f in (SMOLVLM, CHATML)}
