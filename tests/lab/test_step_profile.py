"""``python -m pisa_lab.e2e --profile``'s kernel groups, read from real kernel names (as Triton,
cuDNN, cuBLAS and ATen name them in a profiler trace on an H200)."""

import pytest

from pisa_lab.e2e.step_profile import group_of


@pytest.mark.parametrize(("name", "group"), [
    ("_pisa_fwd_kernel", "PISA kernels"),
    ("_pool_k_kernel", "PISA kernels"),
    ("_top_blocks_kernel", "PISA kernels"),
    ("_pisa_fwd_hopper", "PISA kernels"),  # the Hopper kernel (it was "other" before)
    ("_radix_kernel", "PISA kernels"),  # adaptive routing's selection
    ("_tail_bias_kernel", "PISA kernels"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0",
     "dense attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false>>", "dense attention"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NNT", "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "GEMM"),
    ("void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda>", "copies and layout"),
    ("Memcpy DtoD (Device -> Device)", "copies and layout"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copies and layout"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "other"),
])
def test_kernel_groups(name, group):
    assert group_of(name) == group
