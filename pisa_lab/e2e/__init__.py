"""End-to-end speed of the PISA Patch node inside ComfyUI, at real model sizes (issue 6).

    COMFYUI_PATH=~/comfy/ComfyUI python -m pisa_lab.e2e --json out/e2e.json --md out/e2e.md
    python -m pisa_lab.e2e --toy                      # CPU, tiny models, reference backend (< 1 min)

Builds ComfyUI's own diffusion models (Wan2.1-14B and 1.3B, HunyuanVideo, FLUX.1-dev) with random
bf16 weights on the GPU and times one model forward, i.e. one sampling step, the way a sampler
calls it: ``BaseModel.apply_model`` with the conditioning run through the model's ``extra_conds``,
the patcher's wrappers and callbacks merged into ``transformer_options`` (as
``comfy.sampler_helpers.prepare_model_patcher`` does), ``sample_sigmas``, ``sigmas``,
``cond_or_uncond`` and ``uuids`` set as ``comfy.samplers._calc_cond_batch`` sets them.  The model
configurations are ComfyUI's own: a state dict with the real checkpoint's keys and shapes (built on
the meta device, no memory) goes through ``comfy.model_detection.model_config_from_unet``, which
picks the ``supported_models`` class and fills in the rest, exactly as when loading the checkpoint.

Per model, in one process:

* **dense**: the unpatched model, ComfyUI's default attention (``optimized_attention``: PyTorch SDPA
  on CUDA), with PyTorch's default SDPA priority and, unless ``--sdpa default``, once more with
  cuDNN attention first (ComfyUI's own priority list on Windows).  The faster is the baseline.
* **gated**: the PISA-patched model (the node's own ``patch`` at its default widgets) at a step it
  keeps dense (``dense_steps``): must cost what dense costs.
* **sparse**: the patched model at its first sparse step.
* **no-attention**: every attention call replaced by zeros, i.e. the time of everything else, so
  ``1 - no_attention / dense`` is the share of the step spent in attention.

It reports the per-step speed-up, the share of attention, the attention time PISA's own run
statistics measured (CUDA events around every call), and projects full runs: the bundled workflow's
steps and dense steps, and the issue's 50 steps / 10 dense.  ``--compile`` checks that a patched
model still works under ``torch.compile`` the way ComfyUI's TorchCompileModel node applies it, and
counts graph breaks against the unpatched model.

Each model runs in its own ``try``: an error is recorded and the next model runs.  The JSON and
markdown files are rewritten after every model, so a run cut short still leaves what it measured.
See docs/e2e.md.
"""
