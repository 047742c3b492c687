"""Files: atomic writes (temporary name, then rename), stale temporaries of killed runs, PNG encoding
without the GIL, saved images; and host memory for the GPUs (`flux_ir.io.host_memory`: page-locked
regions made ahead of use, shared by the capture copiers and offloaded weights)."""

from flux_ir.io.atomic import atomic_path, remove_stale_temporaries, temp_path, write_text
from flux_ir.io.images import save_image
from flux_ir.io.png import encode_png, write_png

__all__ = [
    "atomic_path",
    "encode_png",
    "remove_stale_temporaries",
    "save_image",
    "temp_path",
    "write_png",
    "write_text",
]
