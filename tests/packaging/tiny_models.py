"""Write tiny random-weight models in ComfyUI's own file formats, for a real run in the browser test.

Run as a script in a subprocess: `python tiny_models.py <comfyui_root> <models_dir>` (like
comfy_defs.py: importing `comfy` initialises global state, so the pytest process never does it).
Every model is built from that checkout's own classes, so its state dict has exactly the keys and
shapes ComfyUI's loaders detect; the loaders then take every size from the file:

* `diffusion_models/tiny_wan21_t2v.safetensors` (UNETLoader): Wan2.1 T2V, dim 256 (detection
  derives 256 // 128 = 2 heads of 128), 2 blocks. Wan's text width is not in its state dict, so the
  file says `text_dim` 768 in the `config` metadata ComfyUI's detection reads.
* `diffusion_models/tiny_flux.safetensors` (UNETLoader): FLUX (schnell-like, no guidance input),
  hidden 256 (2 heads of 128), one double and one single block, text and pooled width 768.
* `text_encoders/tiny_clip_l.safetensors` (CLIPLoader, type stable_diffusion): a CLIP-L text model
  at full size (123 M parameters, fp16), because ComfyUI builds CLIP-L from a fixed config and the
  tokenizer ships with ComfyUI. Why CLIP-L for both: Wan's umt5-xxl and FLUX's t5-xxl are fixed
  multi-billion-parameter configs, so a random copy cannot be small; CLIP-L's 768-wide hidden states
  and pooled output feed both tiny models through the ordinary CLIPTextEncode node.
* `vae/tiny_wan21_vae.safetensors` (VAELoader): a Wan2.1 video VAE with base width 4 (derived;
  its decoder dominates the run time).
* `vae_approx/taef1_{encoder,decoder}.safetensors` (VAELoader "taef1"): FLUX's tiny autoencoder.

Weights: see `randomize`. Prints each file it writes.
"""
import json
import math
import os
import sys

import torch

SEED = 0
TEXT_DIM = 768  # CLIP-L's width: Wan's text_dim, FLUX's context_in_dim and vec_in_dim


def randomize(module):
    """Seeded random weights at LeCun scale (std 1/sqrt(fan-in)), so activations keep their size
    through the layers and every output is finite and far from constant; biases small; scales of
    norm layers (weight/gamma/scale in a module whose class name says Norm) near 1."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "norm" in type(mod).__name__.lower()
            for name, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if is_norm and name in ("weight", "gamma", "scale"):
                    p.copy_(1.0 + 0.02 * noise)
                elif p.dim() >= 2:
                    p.copy_(noise / math.sqrt(p[0].numel()))
                else:
                    p.copy_(0.02 * noise)


def build(comfy_root, models_dir):
    sys.path.insert(0, comfy_root)
    os.chdir(comfy_root)
    import utils  # noqa: F401  main.py imports ComfyUI's `utils` package first (see comfy_defs.py)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.flux.model
    import comfy.ldm.wan.model
    import comfy.ldm.wan.vae
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import comfy.utils

    ops = comfy.ops.disable_weight_init

    def save(module, folder, name, dtype=torch.float32, metadata=None, prefix=""):
        randomize(module)
        sd = {k[len(prefix):]: v.to(dtype).contiguous() for k, v in module.state_dict().items() if k.startswith(prefix)}
        os.makedirs(os.path.join(models_dir, folder), exist_ok=True)
        comfy.utils.save_torch_file(sd, os.path.join(models_dir, folder, name), metadata=metadata)
        print(f"wrote {folder}/{name}: {sum(t.numel() for t in sd.values()):,} parameters")

    wan = dict(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16,
               text_dim=TEXT_DIM, freq_dim=256, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True,
               cross_attn_norm=True, eps=1e-6)
    save(comfy.ldm.wan.model.WanModel(operations=ops, **wan), "diffusion_models", "tiny_wan21_t2v.safetensors",
         metadata={"config": json.dumps({"transformer": {"text_dim": TEXT_DIM}})})

    flux = dict(in_channels=16, out_channels=16, vec_in_dim=TEXT_DIM, context_in_dim=TEXT_DIM, hidden_size=256,
                mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=False, txt_ids_dims=[])
    save(comfy.ldm.flux.model.Flux(image_model="flux", operations=ops, **flux), "diffusion_models",
         "tiny_flux.safetensors")

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    save(clip.transformer, "text_encoders", "tiny_clip_l.safetensors", dtype=torch.float16)

    vae = comfy.ldm.wan.vae.WanVAE(dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    save(vae, "vae", "tiny_wan21_vae.safetensors")

    taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
    for part in ("encoder", "decoder"):
        save(taesd, "vae_approx", f"taef1_{part}.safetensors", prefix=f"taesd_{part}.")


if __name__ == "__main__":
    build(os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]))
