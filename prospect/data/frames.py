"""Frames of a ProAssist-format video: one arrow file, column `frame`, a base64 JPEG per frame."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

FRAME_COLUMN = "frame"


class FrameError(ValueError):
    """A frames file or one of its frames cannot be used; the message names the file and video."""


def encode_jpeg(image: Image.Image, quality: int = 90) -> str:
    """Base64 text of a JPEG, as ProAssist stores frames."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_jpeg(text: str) -> Image.Image:
    """RGB image from base64 JPEG text; raises ValueError on bad base64 or bad image bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"not a base64 JPEG ({error})") from error
    return image.convert("RGB")


class FrameSource:
    """Lazy access to one video's frames: the arrow file is memory-mapped, a frame is decoded on request."""

    def __init__(self, path: str | Path, video_uid: str):
        from datasets import Dataset  # lazy: datasets costs ~0.7 s, only when a video's frames are read

        self.path = Path(path)
        self.video_uid = video_uid
        if not self.path.is_file():
            raise FrameError(f"{self.path}: frames file missing (video {video_uid})")
        try:
            self._table = Dataset.from_file(str(self.path))
        except Exception as error:  # pyarrow raises several types for a broken file
            raise FrameError(f"{self.path}: not a readable arrow file (video {video_uid}): {error}") from error
        if FRAME_COLUMN not in self._table.column_names:
            raise FrameError(
                f"{self.path}: no '{FRAME_COLUMN}' column (has {self._table.column_names}; video {video_uid})"
            )

    def __len__(self) -> int:
        return self._table.num_rows

    def image(self, original_index: int) -> Image.Image:
        """Decode frame `original_index` (0-based index in the file)."""
        if not 0 <= original_index < len(self):
            raise FrameError(
                f"{self.path}: frame {original_index} out of range 0..{len(self) - 1} (video {self.video_uid})"
            )
        text = self._table[original_index][FRAME_COLUMN]
        try:
            return decode_jpeg(text)
        except ValueError as error:
            raise FrameError(f"{self.path}: frame {original_index} of video {self.video_uid}: {error}") from error


class ImageListSource:
    """Frames already in memory (a list of PIL images, index = frame index in the video)."""

    def __init__(self, images: list, video_uid: str):
        self.images = images
        self.video_uid = video_uid

    def __len__(self) -> int:
        return len(self.images)

    def image(self, original_index: int) -> Image.Image:
        if not 0 <= original_index < len(self.images):
            raise FrameError(f"video {self.video_uid}: frame {original_index} out of range 0..{len(self.images) - 1}")
        return self.images[original_index].convert("RGB")
