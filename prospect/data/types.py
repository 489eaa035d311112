"""The stream a conversation becomes: frames in order, the text turns fed before each, references.

Times are seconds, frame indices are 0-based. A conversation is one (video, user type) sample of
ProAssist's prepared data; conversations are never pooled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from prospect.data.frames import FrameSource


@dataclass(frozen=True)
class Turn:
    """A text turn of the conversation. role: system | user | assistant; time in seconds (None for system)."""

    role: str
    content: str
    time: float | None = None


@dataclass(frozen=True)
class StreamFrame:
    """One frame of the stream.

    index: stream index k (0-based, after the clip start); original_index: frame index in the video file;
    time: (k + 1) / fps seconds (ProAssist); turns_before: system/user turns fed as text before this
    frame's image tokens; reference: the ground-truth assistant turn due after this frame, or None.
    """

    index: int
    original_index: int
    time: float
    turns_before: tuple[Turn, ...] = ()
    reference: str | None = None


@dataclass
class Conversation:
    """One (video, user type) sample as a stream.

    system_prompt: the system turn(s) before the first frame; task_goal and knowledge come from the
    sample's metadata; add_knowledge says whether the sample puts the knowledge in the context.
    """

    id: str
    video_uid: str
    subset: str
    user_type: str
    fps: float
    system_prompt: str
    task_goal: str
    knowledge: str
    add_knowledge: bool
    frames: list[StreamFrame]
    frame_source: FrameSource | None = field(default=None, repr=False)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def references(self) -> list[StreamFrame]:
        return [f for f in self.frames if f.reference is not None]

    def image(self, k: int) -> Image.Image:
        """The RGB image of stream frame k, decoded now (frames are never decoded ahead)."""
        if self.frame_source is None:
            raise ValueError(f"conversation {self.id} has no frames source")
        return self.frame_source.image(self.frames[k].original_index)
