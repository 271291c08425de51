"""The measuring lab: everything that measures or demonstrates PISA, never imported by the node.

* ``python -m pisa_lab.bench`` - the attention kernel against cuDNN dense and Sol-Attn.
* ``python -m pisa_lab.eval`` - fidelity against dense attention on generated DiT-like sets or captures.
* ``python -m pisa_lab.demo`` - the README's demo (``scripts/demo.sh``).
* ``python -m pisa_lab.ab`` - a kernel change against another version of its module, in one process.
* ``python -m pisa_lab.e2e`` - the PISA Patch node inside ComfyUI at real model sizes.
* :mod:`pisa_lab.workloads` - the generated DiT-like attention sets.

It imports :mod:`pisa_kernels` (the library) and, for the end-to-end tool, ComfyUI and the pack
the way ComfyUI loads it; the library and the node import nothing from here.
"""
