"""Errors the library raises on purpose, in a module of their own so that every other module (the
backend choice, the launcher, the API, the node layer) can import them without importing each
other."""


class KernelDoesNotFit(RuntimeError):
    """No launch configuration of a Triton kernel fits this GPU's shared memory for the call's dtype,
    head dim and block size (fp32 inputs of head dim 128 on sm86/sm89's 99 KB, for one).
    ``backend="auto"`` then runs the PyTorch reference; the ComfyUI node runs the call dense."""
