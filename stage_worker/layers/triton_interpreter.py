"""Running the Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1).

CPU CI runs the GPU attention kernels this way, inside the tests and inside real stage
processes (`--attention-backend triton` on CPU). Nothing here matters on a GPU.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fix_loop_bounds_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a loop bound computed inside a kernel (a 1-element
    numpy array there) into a Python int with int(array), which numpy >= 2.4 refuses
    (triton-lang/triton#9171). Gives the interpreter's tensors the same conversion through a
    0-d view. Idempotent; does nothing where the interpreter's internals differ."""
    import numpy as np
    from triton.runtime import interpreter

    if tuple(int(x) for x in np.__version__.split(".")[:2]) < (2, 4):
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_index_fixed", False):
        return

    def patched(tensor: type, scope: object) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    patched._index_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched
