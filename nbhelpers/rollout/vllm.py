"""Optional vLLM sampling path (off by default; needs the vllm package and a merged checkpoint on disk)."""

from __future__ import annotations

from typing import Any, Sequence

from .logits import truncate_at_eos


def collapse_image_pads(token_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Runs of image placeholder tokens collapsed to one (vLLM expands placeholders itself)."""
    out: list[int] = []
    for t in token_ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(int(t))
    return out


_vllm_instances: dict[str, Any] = {}


def vllm_sample(model, prompt_inputs: dict, n: int, *, max_new_tokens: int, temperature: float, top_p: float,
                top_k: int | None, eos_token_ids: Sequence[int], images: Sequence | None) -> list[list[int]]:
    """n completions through vLLM (off by default). The model must be a plain (merged) checkpoint folder
    or hub id (``model.name_or_path``); pass the prompt's images as PIL images."""
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError("rollout engine 'vllm' needs the vllm package, which is not installed; install a "
                           "vllm release that supports Qwen2.5-VL on a CUDA machine, or use engine 'fast' or "
                           "'auto'") from err
    if hasattr(model, "get_base_model"):
        raise ValueError("rollout engine 'vllm' loads weights from disk: merge the LoRA adapter "
                         "(model.merge_and_unload().save_pretrained(folder)) and load that folder")
    path = getattr(model, "name_or_path", "") or ""
    if not path:
        raise ValueError("rollout engine 'vllm' needs model.name_or_path (a checkpoint folder or hub id)")
    if images is None:
        raise ValueError("rollout engine 'vllm' needs images=[PIL images of the prompt]")
    llm = _vllm_instances.get(path)
    if llm is None:
        llm = _vllm_instances[path] = vllm.LLM(model=path, limit_mm_per_prompt={"image": max(1, len(images))})
    image_token_id = int(model.config.image_token_id)
    prompt = {"prompt_token_ids": collapse_image_pads(prompt_inputs["input_ids"][0].tolist(), image_token_id),
              "multi_modal_data": {"image": list(images)}}
    params = vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k or -1,
                                 max_tokens=max_new_tokens, stop_token_ids=list(eos_token_ids))
    result = llm.generate([prompt], params, use_tqdm=False)[0]
    return truncate_at_eos([list(o.token_ids) for o in result.outputs], eos_token_ids)
