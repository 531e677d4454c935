"""Model loading: hub models, local folders, and two offline random models (names in nbhelpers.registry).

* ``tiny-random``: a Qwen2.5-VL of a few hundred thousand parameters with a 512-token byte-level
  vocabulary (special tokens at small ids, set consistently in tokenizer and config), built from a
  config with fixed-seed random weights, so the real processor and model classes run on a CPU with
  no download. The same seed always gives the same weights, so a LoRA adapter trained on it can be
  re-applied in another process.
* ``qwen2-5-3b-random``: the real 3B architecture with random weights, for GPU benchmarks; it uses
  Qwen's own vocabulary size and special-token ids.
* ``tiny-pretrained``: a small Qwen2.5-VL that chartrl pretrains itself (``tools/pretrain_tiny.py``),
  supervised on synthetic charts with Chart-RVR completions, shipped in ``nbhelpers/assets/`` with its
  own byte-level BPE tokenizer; the embedded default, whose rewards and Pass@k are not zero.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from .registry import MODEL_REGISTRY, resolve_model

log = logging.getLogger(__name__)

# Chat template of Qwen2.5-VL, reduced to what chartrl sends (system/user/assistant, images, text).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                       "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                       "<|video_pad|>": 151656}
TINY_VOCAB_SIZE = 512
TINY_WEIGHT_SEED = 1234
TOKENIZER_FILE = "tokenizer.json"


# --------------------------------------------------------------------------- tokenizers / processors
def _byte_level_tokenizer(special: dict[str, int], vocab_size: int | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update(special)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    if vocab_size is not None:
        assert max(special.values()) < vocab_size
    return fast


def tiny_special_tokens() -> dict[str, int]:
    """Qwen's special tokens renumbered right after the 256 byte tokens."""
    return {tok: 256 + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}


def build_offline_processor(max_pixels: int, min_pixels: int | None = None, tiny: bool = True):
    """A Qwen2.5-VL processor built offline: byte-level tokenizer, Qwen special tokens, pixel budget."""
    special = tiny_special_tokens() if tiny else QWEN_SPECIAL_TOKENS
    return _image_only_processor(_byte_level_tokenizer(special, TINY_VOCAB_SIZE if tiny else None),
                                 max_pixels, min_pixels)


def processor_from_tokenizer_file(path: str | Path, max_pixels: int, min_pixels: int | None = None):
    """The processor of a shipped model: its ``tokenizer.json`` (holding Qwen's special tokens) with
    chartrl's chat template, and the image pixel budget."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return _image_only_processor(tokenizer, max_pixels, min_pixels)


def _image_only_processor(tokenizer, max_pixels: int, min_pixels: int | None):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    min_pixels = min(min_pixels or 28 * 28, max_pixels)
    # The PIL backend needs no torchvision; chartrl sends images only, so there is no video processor.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=CHAT_TEMPLATE)


def _image_only_processor_class():
    """Qwen2.5-VL's processor without its video processor (which would need torchvision)."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2_5_VLProcessor


# --------------------------------------------------------------------------- configs
def _config(text: dict, vision: dict, special: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    text = dict(text, eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"],
                bos_token_id=special["<|endoftext|>"])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
                           vision_start_token_id=special["<|vision_start|>"],
                           vision_end_token_id=special["<|vision_end|>"])
    for c in (cfg, cfg.text_config):
        c.eos_token_id = special["<|im_end|>"]
        c.pad_token_id = special["<|endoftext|>"]
        c.bos_token_id = special["<|endoftext|>"]
    return cfg


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of Qwen's special tokens in ``tokenizer`` (each must exist)."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    missing = [tok for tok, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    return ids


def small_vl_config(special: dict[str, int], vocab_size: int, *, layers: int, hidden: int, intermediate: int,
                    heads: int, kv_heads: int, vision_depth: int, vision_hidden: int, vision_heads: int):
    """A small Qwen2.5-VL config (head dim = hidden / heads; M-RoPE sections split that dim 1:1.5:1.5)."""
    half = hidden // heads // 2
    temporal = half // 4
    spatial = (half - temporal) // 2
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [half - 2 * spatial, spatial, spatial]})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=vision_heads, out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1],
                  window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return _config(text, vision, special)


def tiny_config():
    """Config of ``tiny-random``: 2 text layers of width 64, 2 vision blocks, 512-token vocabulary."""
    text = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    return _config(text, vision, tiny_special_tokens())


def qwen_3b_config():
    """Config of the real Qwen2.5-VL-3B-Instruct architecture (3.75 B parameters)."""
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, tokens_per_second=2)
    return _config(text, vision, QWEN_SPECIAL_TOKENS)


# --------------------------------------------------------------------------- loading
def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def build_random_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       attn_implementation: str = "sdpa"):
    """Instantiate ``tiny-random`` or ``qwen2-5-3b-random`` with fixed-seed random weights.

    ``device="meta"`` builds the structure without memory (parameter counting).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_config() if name == "tiny-random" else qwen_3b_config()
    cfg._attn_implementation = attn_implementation
    fork_devices = [] if str(device) in ("cpu", "meta") else None
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(TINY_WEIGHT_SEED)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.config._name_or_path = name  # adapters name their base model
    model.name_or_path = name
    model.config.chartrl_base_model = name  # saved in config.json: a fine-tuned copy knows its offline processor
    return model.to(dtype) if str(device) != "meta" else model


def load_processor(vlm_name: str, max_pixels: int, min_pixels: int | None = None):
    """The processor of a registry model or folder, with the image pixel budget applied.

    An adapter folder uses its base model's processor; so does a folder trained from an offline
    random model (its config names the registry entry).
    """
    kind, location = resolve_model(vlm_name)
    if kind == "random":
        return build_offline_processor(max_pixels, min_pixels, tiny=(vlm_name == "tiny-random"))
    if kind == "asset":
        return processor_from_tokenizer_file(Path(location) / TOKENIZER_FILE, max_pixels, min_pixels)
    if kind == "local":
        base = _local_base(location)
        if base is not None:
            return load_processor(base, max_pixels, min_pixels)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(location, min_pixels=min(min_pixels or 28 * 28, max_pixels),
                                         max_pixels=max_pixels)


def _local_base(folder: str) -> str | None:
    """The model a local folder builds on: an adapter's base, or a random registry model it was trained from."""
    import json

    if (Path(folder) / "adapter_config.json").is_file():
        return _adapter_base(folder)
    name = json.loads((Path(folder) / "config.json").read_text()).get("chartrl_base_model")
    return name if name in MODEL_REGISTRY and MODEL_REGISTRY[name].source in ("random", "asset") else None


def _adapter_base(adapter_dir: str) -> str:
    import json

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json: key 'base_model_name_or_path' is missing")
    return base


def load_model(vlm_name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa"):
    """Load weights for a registry name, a local model folder, or a LoRA adapter folder (base + adapter)."""
    # The pinned PEFT and TRL still read transformers' deprecated `is_gradient_checkpointing` (wrapping a
    # model, saving a checkpoint); the warning is theirs, repeats at every save, and asks nothing of the user.
    warnings.filterwarnings("ignore", category=FutureWarning, message="`is_gradient_checkpointing` is deprecated")
    kind, location = resolve_model(vlm_name)
    if kind == "random":
        return build_random_model(vlm_name, dtype, device, attn_implementation)
    if kind == "local" and (Path(location) / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(_adapter_base(location), dtype, device, attn_implementation)
        return PeftModel.from_pretrained(base, location, is_trainable=False).to(device)
    from transformers import Qwen2_5_VLForConditionalGeneration

    with _no_loading_bar():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            location, dtype=dtype, attn_implementation=attn_implementation).to(device)
    if kind == "asset":  # adapters and fine-tuned copies name the registry entry, not this machine's path
        model.config._name_or_path = model.name_or_path = vlm_name
    return model


@contextlib.contextmanager
def _no_loading_bar():
    """transformers' "Loading weights" bar is off while loading: in a notebook it is a widget, saved at 0%."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.05, targets=None):
    """PEFT LoRA config on the language model's projections (the vision tower stays frozen)."""
    from peft import LoraConfig

    from .config import DEFAULT_LORA_TARGETS

    targets = list(targets or DEFAULT_LORA_TARGETS)
    # Plain names, as the Chart-RVR seeds use them: they also match the vision blocks' gate/up/down MLP
    # projections (the real 3B model then reports 18,576,384 trainable parameters at r=8).
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=targets,
                      task_type="CAUSAL_LM")


def count_trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05, targets=None):
    """Wrap ``model`` with LoRA adapters (the base weights are frozen)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(r, alpha, dropout, targets))


def model_summary(model) -> dict[str, Any]:
    """Parameter counts and weight bytes (units: parameters, bytes)."""
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "weight_bytes": sum(p.numel() * p.element_size() for p in params)}
