"""The decode step's projection weights, with PEFT LoRA adapters at (about) the cost of the bare model.

Per decoder layer the seven projections form four groups that share an input: (q, k, v), (o), (gate, up),
(down). Three modes:

* ``fused``: each group's weights concatenated into one engine-owned copy (one matrix product per group),
  with the active LoRA adapters merged in (W + scaling * B @ A, computed in float32 and rounded once to the
  compute dtype). :meth:`DecodeWeights.refresh` recomputes the copies in place, once per engine run (once
  per generation batch in training), so CUDA graphs stay valid; the model's own parameters are only read.
  In bf16/fp16 a merged copy rounds W + delta to the compute dtype, so a delta below half a unit in the last
  place of W is not seen by the rollouts (unmerged, PEFT adds it in the compute dtype after the base product).
* ``adapters``: the model's own base weights (no copy) plus each group's LoRA A matrices concatenated and the
  B matrices pre-scaled, cast to the compute dtype (a few MB): one extra small product per group and one
  fused multiply-add per projection. The mode where a copy does not fit (a T4 training run).
* ``modules``: the model's modules called as they are (the PEFT path: adapters in their own dtype).

:func:`choose_mode`: fused where the copies take at most a quarter of the device memory and half of what is
free, else adapters; ``CHARTRL_ROLLOUT_WEIGHTS`` forces one; LoRA variants the engine does not implement
(DoRA, adapter biases) use modules.

:class:`ComputeCopies`: a bf16/fp16 copy of a whole model whose fp32 master weights training updates (full
fine-tuning under autocast), for the engine to decode with at the compute dtype's speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .notices import forced_weights_mode, warn_once

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


class UnsupportedAdapter(ValueError):
    pass


def lora_parts(module) -> tuple[torch.nn.Linear, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """(base nn.Linear, [(A [r, in], B [out, r], scaling) per active adapter]) of a projection.

    A plain nn.Linear has no adapters; a PEFT LoRA layer that is merged in place or has its adapters disabled
    acts as its base layer. Raises UnsupportedAdapter for LoRA variants (DoRA, ...) and adapter biases.
    """
    base = getattr(module, "base_layer", None)
    if base is None:
        return module, []
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return base, []
    parts = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
            raise UnsupportedAdapter(f"adapter '{name}' is a LoRA variant (DoRA or similar)")
        if module.lora_B[name].bias is not None:
            raise UnsupportedAdapter(f"adapter '{name}' has a bias")
        parts.append((module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])))
    return base, parts


def merged_weight(weight: torch.Tensor, adapters, dtype: torch.dtype) -> torch.Tensor:
    """W + sum(scaling * B @ A) in float32, rounded once to ``dtype`` (W itself is never changed)."""
    if not adapters:
        return weight.to(dtype)
    out = weight.to(torch.float32, copy=True)
    for a, b, scaling in adapters:
        out.addmm_(b.to(torch.float32), a.to(torch.float32), alpha=scaling)
    return out.to(dtype)


@dataclass
class _Group:
    """Projections sharing one input; ``__call__`` returns their outputs in order."""

    modules: list
    mode: str
    dtype: torch.dtype
    sizes: list[int] = field(default_factory=list)
    weight: torch.Tensor | None = None  # fused: [sum out, in]
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None  # adapters: [sum r, in]
    lora_b: list = field(default_factory=list)  # adapters: per module [out, r] pre-scaled, or None
    ranks: list[int] = field(default_factory=list)

    def refresh(self) -> None:
        parts = [lora_parts(m) for m in self.modules]
        self.sizes = [base.out_features for base, _ in parts]
        if self.mode == "fused":
            if len(parts) == 1 and not parts[0][1] and parts[0][0].weight.dtype == self.dtype:
                self.weight, self.bias = parts[0][0].weight, parts[0][0].bias  # nothing to fuse or merge: no copy
                return
            weight = torch.cat([merged_weight(base.weight, adapters, self.dtype) for base, adapters in parts])
            biases = [base.bias for base, _ in parts]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b.to(self.dtype) if b is not None else torch.zeros(s, dtype=self.dtype, device=weight.device)
                 for b, s in zip(biases, self.sizes)])
            if self.weight is None or self.weight.shape != weight.shape or isinstance(self.weight, torch.nn.Parameter):
                self.weight, self.bias = weight, bias
            else:  # in place: CUDA graphs read this storage
                self.weight.copy_(weight)
                if bias is not None:
                    self.bias.copy_(bias)
            return
        if self.mode == "adapters":
            a_parts, b_parts, ranks = [], [], []
            for _, adapters in parts:
                if adapters:
                    a_parts.append(torch.cat([a for a, _, _ in adapters]))
                    b_parts.append(torch.cat([b * s for _, b, s in adapters], dim=1).to(self.dtype))
                    ranks.append(a_parts[-1].shape[0])
                else:
                    b_parts.append(None)
                    ranks.append(0)
            lora_a = torch.cat(a_parts).to(self.dtype) if a_parts else None
            self.ranks = ranks
            if self.lora_a is not None and lora_a is not None and self.lora_a.shape == lora_a.shape \
                    and all(x is not None and y is not None and x.shape == y.shape or x is y is None
                            for x, y in zip(self.lora_b, b_parts)):
                self.lora_a.copy_(lora_a)
                for old, new in zip(self.lora_b, b_parts):
                    if old is not None:
                        old.copy_(new)
            else:
                self.lora_a, self.lora_b = lora_a, b_parts

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.mode == "modules":
            return [m(x) for m in self.modules]
        if self.mode == "fused":
            if len(self.modules) == 1 and self.weight is None:
                raise RuntimeError("decode weights used before refresh()")
            return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))
        bases = [lora_parts(m)[0] for m in self.modules]
        outs = [F.linear(x, base.weight, base.bias) for base in bases]
        if self.lora_a is None:
            return outs
        low = F.linear(x, self.lora_a)  # [R, sum r]
        start = 0
        for j, (rank, b) in enumerate(zip(self.ranks, self.lora_b)):
            if rank:
                outs[j] = torch.addmm(outs[j], low[:, start:start + rank], b.t())
                start += rank
        return outs


class DecodeWeights:
    """The four projection groups of every decoder layer (see the module docstring for the modes)."""

    def __init__(self, layers, mode: str, dtype: torch.dtype) -> None:
        self.mode = mode
        self.groups = [[_Group([getattr(getattr(layer, holder), name) for name in names], mode, dtype)
                        for holder, names in GROUPS] for layer in layers]
        self.refresh()

    def refresh(self) -> None:
        """Recompute fused copies / cast adapters from the model's current parameters (in place)."""
        if self.mode == "modules":
            return
        with torch.no_grad():
            for layer_groups in self.groups:
                for group in layer_groups:
                    group.refresh()

    def qkv(self, i: int, x: torch.Tensor):
        return self.groups[i][0](x)

    def o(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.groups[i][1](x)[0]

    def gate_up(self, i: int, x: torch.Tensor):
        return self.groups[i][2](x)

    def down(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.groups[i][3](x)[0]

    def copy_bytes(self) -> int:
        """Bytes of engine-owned weight copies (fused copies, cast adapters)."""
        owned = [t for layer in self.groups for g in layer for t in [g.weight, g.bias, g.lora_a, *g.lora_b]
                 if t is not None and not isinstance(t, torch.nn.Parameter)]
        return sum(t.numel() * t.element_size() for t in owned)


def fused_copy_bytes(layers, dtype: torch.dtype) -> int:
    """Bytes the fused copies of ``layers``' projections would take in ``dtype`` (a group of one projection
    without adapters is read in place, not copied)."""
    size = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for layer in layers:
        for holder, names in GROUPS:
            parts = [lora_parts(getattr(getattr(layer, holder), name)) for name in names]
            if len(parts) > 1 or parts[0][1]:
                total += sum(base.weight.numel() for base, _ in parts) * size
    return total


def memory_budget(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes this process may still use on a CUDA device, honouring a per-process memory cap."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device) \
        if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0
    cap = int(fraction * total)
    return max(0, min(free, cap - torch.cuda.memory_reserved(device))), cap


def fused_copies_fit(need: int, free: int, total: int) -> bool:
    """Whether fused copies of ``need`` bytes may stay resident: at most a quarter of the device memory this
    process may use (``total``) and half of what is free now (the rest is for KV, training and activations)."""
    return need <= 0.25 * total and need <= 0.5 * free


def choose_mode(layers, device: torch.device, dtype: torch.dtype, requested: str | None = None) -> str:
    """The decode-weights mode: requested or forced by the environment, else fused where memory allows."""
    mode = requested or forced_weights_mode()
    try:
        for layer in layers:
            for holder, names in GROUPS:
                for name in names:
                    lora_parts(getattr(getattr(layer, holder), name))
    except UnsupportedAdapter as err:
        if mode not in (None, "modules"):
            warn_once(f"fast rollout engine: decode weights '{mode}' unavailable ({err}); calling the modules")
        return "modules"
    if mode is not None:
        return mode
    if device.type != "cuda":
        return "fused"
    free, total = memory_budget(device)
    need = fused_copy_bytes(layers, dtype)
    if fused_copies_fit(need, free, total):
        return "fused"
    warn_once(f"fast rollout engine: fused weight copies ({need / 1e9:.1f} GB) do not fit beside the model "
              f"({free / 1e9:.1f} GB free of {total / 1e9:.1f} GB); LoRA adapters run unmerged in {dtype}")
    return "adapters"


class ComputeCopies:
    """A copy of ``model`` in a low-precision compute ``dtype`` for the engine to decode with, while training
    updates ``model``'s fp32 master weights (full fine-tuning under bf16/fp16 autocast).

    The copy has ``model``'s class and config, built without initialisation; its parameters are the masters
    rounded once to ``dtype`` (tied parameters stay tied), its buffers (rotary frequencies) the master's own
    values, and it never needs gradients. :meth:`refresh` copies the masters into it in place, so its storage,
    and the engine's CUDA graphs that read it, stay valid. Memory: 2 bytes per parameter in bf16/fp16.
    """

    def __init__(self, model, dtype: torch.dtype) -> None:
        self.master = model
        self.dtype = dtype
        self.model = _uninitialised_copy(model, dtype)
        copies = dict(self.model.named_parameters())
        masters = dict(model.named_parameters())
        if copies.keys() != masters.keys():
            raise ValueError("compute copies: the copy's parameters differ from the model's")
        self._pairs = [(copies[name], master) for name, master in masters.items()]
        self.version = None  # the key of the weights the copy holds (None: not filled yet)
        self.refreshes = 0  # copies made so far

    def refresh(self, version) -> bool:
        """Copy the masters into the copy unless it already holds the weights of ``version`` (any hashable key
        that changes whenever the masters do, e.g. the optimizer step count); True when it copied."""
        if self.version is not None and version == self.version:
            return False
        with torch.no_grad():
            for copy, master in self._pairs:
                copy.copy_(master)
        self.version = version
        self.refreshes += 1
        return True

    def copy_bytes(self) -> int:
        """Bytes of the copy's parameters."""
        return sum(copy.numel() * copy.element_size() for copy, _ in self._pairs)


def _uninitialised_copy(model, dtype: torch.dtype):
    """``model``'s class built from its config on the meta device, then given empty parameters of ``dtype`` (one
    tensor per tied group) on the model's device and clones of the model's buffers; eval mode, no gradients."""
    device = next(model.parameters()).device
    with torch.device("meta"):
        copy = type(model)(model.config)
    made: dict[int, torch.nn.Parameter] = {}
    for module in copy.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                kind = dtype if param.is_floating_point() else param.dtype
                made[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=kind, device=device),
                                                     requires_grad=False)
            module._parameters[name] = made[id(param)]
    masters = dict(model.named_modules())
    for name, module in copy.named_modules():
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[key] = masters[name]._buffers[key].detach().clone()
    return copy.eval()
