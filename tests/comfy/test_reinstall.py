"""Keeping the override in place when something else writes the same key, on today's cores and with
fakes of the late-2026 API (3-argument ON_PREPARE_STATE, ``set_model_optimized_attention``).

``set_model_optimized_attention(fn)`` (late 2026) writes ``lambda _, *a, **kw: fn(*a, **kw)`` over
whatever override is there, without chaining; "Model Attention Backend" uses it.
"""

import torch

OVERRIDE = "optimized_attention_override"


def set_model_optimized_attention(model, fn):
    """What late-2026 ``ModelPatcher.set_model_optimized_attention`` does to model_options."""
    model.model_options.setdefault("transformer_options", {})[OVERRIDE] = lambda _, *a, **kw: fn(*a, **kw)


def counting_backend(counter):
    def backend(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                **kwargs):
        from comfy.ldm.modules.attention import attention_basic

        counter.append(q.shape)
        return attention_basic.__wrapped__(q, k, v, heads, mask=mask, attn_precision=attn_precision,
                                           skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    return backend


def chain(fn):
    """The overrides below ``fn``, following PISA's tag and the test's ``previous`` attribute."""
    out = []
    while fn is not None:
        out.append(fn)
        fn = getattr(fn, "pisa_previous", None) or getattr(fn, "previous", None)
    return out


def test_late_writer_is_overridden_each_forward_on_todays_cores(tiny, sample, patch):
    """v0.3.64 / v0.19.3 pass no model_options to ON_PREPARE_STATE: the DIFFUSION_MODEL wrapper puts
    PISA back on top of the later writer, which becomes PISA's dense path."""
    tm = tiny("wan")
    patched, state = patch(tm.patcher, sparsity=0.5, dense_steps=1, dense_blocks="", min_tokens=0)
    backend_calls = []
    later = patched.clone()
    set_model_optimized_attention(later, counting_backend(backend_calls))
    sample(tm, later)
    stats = state.last_summary
    assert stats["pisa_calls"] == 2 * tm.blocks
    assert len(backend_calls) == stats["dense_calls"] == 2 + 3 * 2  # step 0 self-attention + all cross


def test_three_argument_prepare_state_reinstalls_on_the_live_options(tiny, patch, comfy):
    tm = tiny("wan")
    patched, state = patch(tm.patcher, sparsity=0.5)
    later = patched.clone()
    set_model_optimized_attention(later, counting_backend([]))
    replaced = later.model_options["transformer_options"][OVERRIDE]
    live = comfy.model_patcher.create_model_options_clone(later.model_options)  # what the sampler runs on
    callbacks = later.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE)
    assert callbacks
    for step in range(5):  # once per step
        for callback in callbacks:
            callback(later, torch.tensor([1.0 - step / 5]), live)
        top = live["transformer_options"][OVERRIDE]
        assert top.pisa_state is state and top.pisa_previous is replaced
        assert len(chain(top)) == 2, "re-asserting must not grow the chain"
    for callback in callbacks:  # the two-argument form of today's cores is accepted and does nothing
        callback(later, torch.tensor([0.5]))


def test_reassertion_is_idempotent_against_another_reasserting_node(pack, pc):
    """A core-style node that re-installs itself whenever it is not on top (checking only the top)
    and PISA re-asserting every step must not wrap each other without bound."""
    state = pc.patch_state.PisaState(pack.pisa_comfy.PisaSettings())
    options = {OVERRIDE: state.make_override(None)}

    def core_install(options):
        top = options.get(OVERRIDE)
        if getattr(top, "core", False):
            return

        def core(func, *args, **kwargs):
            return top(func, *args, **kwargs) if top is not None else func(*args, **kwargs)

        core.core, core.previous = True, top
        options[OVERRIDE] = core

    for _ in range(20):
        core_install(options)
        state.ensure_installed(options)
    assert len(chain(options[OVERRIDE])) <= 3


def test_a_replacement_is_wrapped_once_per_run(pack, pc):
    state = pc.patch_state.PisaState(pack.pisa_comfy.PisaSettings())
    replacement = lambda func, *a, **kw: func(*a, **kw)  # noqa: E731
    wrapped = []
    for _ in range(3):  # three forwards: fresh per-call options, same replacement on top
        options = {OVERRIDE: replacement}
        state.ensure_installed(options)
        wrapped.append(options[OVERRIDE])
    assert wrapped[0] is wrapped[1] is wrapped[2] and wrapped[0].pisa_previous is replacement
    state.finish_run()
    options = {OVERRIDE: replacement}
    state.ensure_installed(options)
    assert options[OVERRIDE] is not wrapped[0]  # a new run starts afresh
