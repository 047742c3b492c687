"""Files: atomic writes (temporary name, then rename), PNG encoding without the GIL, saved images."""

from flux_ir.io.atomic import atomic_path, write_text
from flux_ir.io.images import save_image
from flux_ir.io.png import encode_png, write_png

__all__ = ["atomic_path", "encode_png", "save_image", "write_png", "write_text"]
