"""Every use of diffusers' and peft's private names, in one module: a diffusers or peft upgrade starts here.

Written against diffusers 0.42.1 and peft 0.21 (``pyproject.toml`` pins ``diffusers>=0.42.1,<0.43`` and
``peft>=0.21,<0.22``). Everything else in ``deployments`` calls the small public functions below and
touches no underscore name of either library; ``tests/test_layers.py`` holds that rule. After an
upgrade, check each function against the new source, then run the full test tier.

The private names, by what they are for:

- LoRA files (``lora/files.py``): ``diffusers.utils.state_dict_utils._load_sft_state_dict_metadata``
  (the adapter metadata stock ``load_lora_weights`` reads), ``diffusers.utils.peft_utils._create_lora_config``
  (the ``LoraConfig`` stock builds from a state dict).
- Loading a LoRA from a state dict (``engine/pipeline.py``): ``diffusers.loaders.lora_pipeline
  ._LOW_CPU_MEM_USAGE_DEFAULT_LORA``, ``WanImageToVideoPipeline._maybe_expand_t2v_lora_for_i2v``.
- FP8 base layers under peft (``engine/memory.py``, ``engine/pipeline.py``): peft's module
  ``peft.tuners.lora.torchao`` and its ``is_torchao_available``, patched while adapters are added.
- peft's per-layer adapter switches (``speed/exact.py``): ``LoraLayer._active_adapter``,
  ``LoraLayer._disable_adapters``.
- Attention backends (``speed/attention.py``, ``speed/modes.py``):
  ``diffusers.models.attention_dispatch._AttentionBackendRegistry`` (its ``_active_backend``),
  ``_HUB_KERNELS_REGISTRY``, and each attention processor's ``_attention_backend`` and
  ``_parallel_config``.
- Context parallelism (``parallel/ranks.py``): ``diffusers.models._modeling_parallel``
  (``ContextParallelConfig``, ``ParallelConfig``), ``diffusers.hooks.context_parallel
  ._CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE`` and ``._get_submodule_by_name``, the transformer class's
  ``_cp_plan``, a model's ``_parallel_config`` and ``_resolve_parallel_config``, and the split hook's
  forward metadata ``_cls``.

diffusers and peft are imported inside the functions, as their callers did, so importing this module
costs nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# ---------------------------------------------------------------------------------------------
# LoRA files


def load_sft_metadata(path: str) -> dict | None:
    """The safetensors file's ``lora_adapter_metadata``, read by diffusers' own reader (``None`` if absent).

    Raises:
        json.JSONDecodeError: the entry is not JSON; safetensors' own errors for a header it cannot parse.
    """
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

    return _load_sft_state_dict_metadata(path)


def create_lora_config(state_dict: dict, metadata: dict | None, rank_pattern: dict, adapter_name: str):
    """The peft ``LoraConfig`` stock ``load_lora_adapter`` builds for a (prefix-stripped) state dict."""
    from diffusers.utils.peft_utils import _create_lora_config

    return _create_lora_config(state_dict, None, metadata, rank_pattern, model_state_dict=None,
                               adapter_name=adapter_name)


# ---------------------------------------------------------------------------------------------
# Loading a LoRA into the pipeline from a state dict


def default_low_cpu_mem_usage_lora() -> bool:
    """What stock ``load_lora_weights`` passes as ``low_cpu_mem_usage`` by default."""
    from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA

    return _LOW_CPU_MEM_USAGE_DEFAULT_LORA


def expand_t2v_lora_for_i2v(pipe, state_dict: dict) -> dict:
    """Stock's step that gives a text-to-video LoRA the image-to-video layers (as ``load_lora_weights``)."""
    return pipe._maybe_expand_t2v_lora_for_i2v(transformer=pipe.transformer, state_dict=state_dict)


@contextmanager
def plain_lora_layers(active: bool = True):
    """While active, peft wraps an FP8 (torchao) Linear in its plain ``lora.Linear``, as it wraps a bf16 one.

    Left alone, peft picks ``TorchaoLoraLinear`` for a torchao weight, which refuses a LoRA bias (the
    compiled LoRA slot has one; LightX2V-style adapters bring one) and differs only in merging, which
    nothing here does: adapters stay unmerged beside the base layer. The plain layer over an FP8 base
    layer is what fast mode has always run (its FP8 copies are swapped in under peft's wrappers).
    """
    module = None
    if active:
        try:
            import peft.tuners.lora.torchao as module
        except ImportError:
            module = None
    if module is None or not hasattr(module, "is_torchao_available"):
        yield
        return
    saved = module.is_torchao_available
    module.is_torchao_available = lambda: False
    try:
        yield
    finally:
        module.is_torchao_available = saved


# ---------------------------------------------------------------------------------------------
# peft's per-layer adapter switches


def active_adapter(layer) -> Any:
    """A peft ``LoraLayer``'s active adapter(s), as peft stores them (a name or a list of names)."""
    return layer._active_adapter


def set_adapter_switches(layer, active: Any, disabled: bool) -> None:
    """Set a ``LoraLayer``'s active adapters and its off switch directly.

    peft's own setters also flip ``requires_grad`` on the adapter weights, which compiled graphs see.
    """
    layer._active_adapter = active
    layer._disable_adapters = disabled


# ---------------------------------------------------------------------------------------------
# Attention backends


def attention_processors(transformer) -> Iterator[Any]:
    """Every attention processor of ``transformer`` that has a backend of its own (diffusers' dispatch)."""
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            yield processor


def processor_backend(processor) -> Any:
    return processor._attention_backend


def set_processor_backend(processor, backend: Any) -> None:
    processor._attention_backend = backend


def processor_is_context_parallel(processor) -> bool:
    """Whether the processor runs context-parallel attention (a sequence split over ranks)."""
    return getattr(processor, "_parallel_config", None) is not None


def active_attention_backend() -> Any:
    """diffusers' process-wide active backend (what a processor without one of its own runs)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry._active_backend


def set_active_attention_backend(backend: Any) -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(backend)


def attention_backend_name(name: str) -> Any:
    """diffusers' ``AttentionBackendName`` for a backend's string name."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName(name)


def install_hub_kernel(backend: str, kernel_fn: Callable) -> None:
    """Put ``kernel_fn`` in a Hub-kernel backend's slot; a kernel already in the slot is never downloaded
    (``_maybe_download_kernel_for_backend``)."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName

    _HUB_KERNELS_REGISTRY[AttentionBackendName(backend)].kernel_fn = kernel_fn


# ---------------------------------------------------------------------------------------------
# Context parallelism


def context_parallel_plan(transformer) -> dict:
    """A copy of the model class's own context-parallel plan (module name -> split or gather)."""
    return dict(type(transformer)._cp_plan)


def enable_context_parallel(transformer, plan: dict, *, ring_degree: int, ulysses_degree: int, mesh,
                            rank: int, world_size: int, device) -> None:
    """``transformer.enable_parallelism`` with ``plan``, on a config resolved on our device mesh."""
    from diffusers.models._modeling_parallel import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig as DiffusersParallel

    cp = ContextParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses_degree, mesh=mesh)
    resolved = DiffusersParallel(context_parallel_config=cp)
    resolved.setup(rank, world_size, device, mesh=cp.mesh)

    # diffusers derives the device as rank % accelerator count (a division by zero on CPU, and
    # not the GPU Ray gave a rank) and builds a mesh over the whole world (ours has a cfg axis):
    # hand it the config resolved on our mesh instead.
    def resolve(_config):
        transformer._parallel_config = resolved
        return resolved

    transformer._resolve_parallel_config = resolve
    transformer.enable_parallelism(config=resolved, cp_plan=plan)
    _resolve_split_arguments(transformer, plan)


def _resolve_split_arguments(transformer, plan: dict) -> None:
    """Work out now, eagerly, where each split hook finds its arguments.

    A hook does it at its module's first call, with ``inspect.signature``; on ``blocks.0`` that call
    is inside a compiled block, where dynamo cannot trace ``inspect`` and ``fullgraph=True`` fails.
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.context_parallel import _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE, _get_submodule_by_name

    for module_id, entry in plan.items():
        if not isinstance(entry, dict):
            continue
        modules = _get_submodule_by_name(transformer, module_id)
        for module in modules if isinstance(modules, list) else [modules]:
            hook = HookRegistry.check_if_exists_or_initialize(module).get_hook(
                _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE.format(module_id))
            meta = getattr(hook, "module_forward_metadata", None)
            if meta is not None and meta.cached_parameter_indices is None:
                names = list(inspect.signature(meta._cls.forward).parameters)[1:]  # without self
                meta.cached_parameter_indices = {name: i for i, name in enumerate(names)}
