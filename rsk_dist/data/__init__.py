"""Data loading. The in-memory loaders here need torch, numpy and pillow only."""
from rsk_dist.data.omniglot import IMAGE_EXTENSIONS, load_digits, load_image_folder_zip

__all__ = ["IMAGE_EXTENSIONS", "load_digits", "load_image_folder_zip"]
