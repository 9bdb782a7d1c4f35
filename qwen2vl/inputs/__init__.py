"""From conversations to pixels: fetching media, images, videos, and the message format."""

from .fetch import MediaPolicy
from .image import VisionSpec, load_image, smart_resize
from .messages import VisionItem, as_batch, vision_items

__all__ = ["MediaPolicy", "VisionSpec", "load_image", "smart_resize", "VisionItem", "as_batch", "vision_items"]
