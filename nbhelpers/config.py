"""Run configuration: one dataclass, loaded from YAML files plus ``key=value`` overrides.

Later sources override earlier ones (defaults < files in order < overrides). Every key's source is
remembered so that an error names the file (or ``--set``) that supplied the bad value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError
from .rewards import MAX_TOTAL_REWARD, REWARD_NAMES

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
PARAMETERS_DIR = REPO_ROOT / "parameters"

MODES = ("grpo", "psr", "nsr", "w-reinforce", "passk")
# TRL loss types whose normaliser we can restrict to the kept samples (see nbhelpers.trainer).
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo")
CORRECTNESS_SOURCES = ("accuracy", "total")
CISPO_EPSILON_HIGH = 5.0  # TRL's GRPOConfig docs: the recommended epsilon_high (ScaleRL's epsilon_max) for cispo
EPSILON = 0.2  # TRL's default lower clipping bound, and its upper one when epsilon_high is unset
FINETUNE_KINDS = ("lora", "full")
DTYPES = ("auto", "bf16", "fp16", "fp32")
ROLLOUT_ENGINES = ("auto", "stock", "fast", "vllm")
DEEPSPEED_CHOICES = ("none", "zero3", "auto")
# TRL's importance-sampling modes (GRPOConfig.vllm_importance_sampling_mode), plus off
IMPORTANCE_SAMPLING_MODES = ("off", "token_truncate", "sequence_truncate", "token_mask", "sequence_mask")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REWARD_KEYS = tuple(name.removesuffix("_reward") for name in REWARD_NAMES)  # the names reward_weights takes


class ConfigError(InputError):
    """A bad configuration value; the message names the key and where it came from."""


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class RunConfig:
    """Every knob of a chartrl run. Field docs are in each field's ``metadata['help']``."""

    # --- what to train -------------------------------------------------------------------
    mode: str = _help(f"Objective: {', '.join(MODES[:-1])} or {MODES[-1]}.", default="grpo")
    vlm_name: str = _help("Model registry name (tiny-pretrained, tiny-random, qwen2-5-3b, qwen2-5-7b, "
                          "qwen2-5-3b-random) or a local model folder.", default="tiny-pretrained")
    dataset_name: str = _help("Training dataset registry name (synthetic, chart-rvr-train, ...).",
                              default="synthetic")
    data_dir: str | None = _help("Folder of local dataset files (PlotQA, ChartFC, EvoChart, ChartBench).",
                                 default=None)
    seed: int = _help("Random seed for data subset, initialisation and sampling.", default=42)
    full_determinism: bool = _help("Deterministic GPU kernels (torch.use_deterministic_algorithms), so a rerun "
                                   "or a resumed run gives bitwise-equal weights; slower.", default=False)
    subset_size: int | None = _help("Number of training problems to use (None: all).", default=None)
    drop_duplicates: bool = _help("Drop exact duplicate training rows.", default=False)
    # --- optimisation --------------------------------------------------------------------
    num_epochs: float = _help("Passes over the training problems.", default=1.0)
    max_steps: int = _help("Stop after this many optimizer steps (-1: from num_epochs).", default=-1)
    num_generations: int = _help("Completions sampled per problem (the group size G).", default=4)
    batch_size: int = _help("Completions per device per micro-batch (TRL per_device_train_batch_size).",
                            default=4)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=2)
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", default=True)
    learning_rate: float = _help("Peak learning rate.", default=1e-5)
    lr_scheduler_type: str = _help("transformers scheduler name.", default="constant")
    warmup_ratio: float = _help("Fraction of all steps spent in linear warm-up, in [0, 1).", default=0.0)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0: off).", default=1.0)
    loss_type: str = _help(
        "TRL loss aggregation: " + ", ".join(LOSS_TYPES) + ". In psr, nsr and w-reinforce, left-out samples count "
        "in no normaliser, over all processes; bnpo is then each micro-batch's token mean over every process's "
        "kept tokens, averaged over the step's micro-batches that keep a token (nbhelpers.trainer."
        "left_out_loss_scale).", default="dapo")
    beta: float = _help("KL coefficient against the reference model (0: no reference model).", default=0.0)
    epsilon_high: float | None = _help(
        "Upper clipping bound of the importance ratio (None: TRL's recommendation for the loss type: "
        f"{CISPO_EPSILON_HIGH} for cispo, where it caps the ratio weight itself (ScaleRL's epsilon_max; "
        "TRL's default 0.2 would cap it at 0.2 and train at a fifth of the scale), else 0.2, the lower bound).",
        default=None)
    # --- objectives ----------------------------------------------------------------------
    lambda_psr: float = _help("Weight of correct samples in w-reinforce, in (0, 1].", default=0.1)
    passk_k: int = _help("k of passk (Pass@k Training's closed-form advantages), an integer in [1, "
                         "num_generations - 1]: k = num_generations gives every group one k-subset and so zero "
                         "advantages; k = 1 is GRPO on the 0/1 correctness reward.", default=4)
    reward_threshold: float = _help(
        "A sample is correct when this is <= its accuracy reward (0 or 1; correctness_from: accuracy) or its "
        "weighted total reward (the sum of the rewards times their weights, 0 to "
        f"{MAX_TOTAL_REWARD} with unit weights, about 10 for a well-formed wrong answer; correctness_from: "
        "total, which has no default: set it explicitly).", default=0.5)
    correctness_from: str = _help("accuracy: threshold the accuracy reward; total: the weighted total.",
                                  default="accuracy")
    reward_weights: dict = _help(f"Weight per reward name ({', '.join(REWARD_KEYS)}); missing names weigh 1.0.",
                                 default_factory=dict)
    length_window: list = _help("[min, max] words of the reasoning steps for the length reward.",
                                default_factory=lambda: [20, 300])
    embedding_model: str | None = _help("Local sentence-transformers model for process_style "
                                        "(None: lexical similarity).", default=None)
    verbose_rewards: bool = _help("Print per-reward lists each step, in the seeds' style.", default=False)
    # --- model ---------------------------------------------------------------------------
    finetune: str = _help("lora or full.", default="lora")
    lora_r: int = _help("LoRA rank.", default=8)
    lora_alpha: int = _help("LoRA alpha.", default=16)
    lora_dropout: float = _help("LoRA dropout, in [0, 1).", default=0.05)
    lora_target_modules: list = _help("Module names that get LoRA adapters.",
                                      default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    dtype: str = _help("Compute dtype: auto (from the platform), bf16, fp16 or fp32. Full fine-tuning without "
                       "DeepSpeed keeps fp32 master weights and computes in bf16/fp16 under autocast; LoRA keeps the "
                       "frozen base weights in this dtype and its adapters in fp32.", default="auto")
    attn_implementation: str = _help("sdpa or eager.", default="sdpa")
    max_prompt_length: int | None = _help("Truncate prompts to this many tokens (None: no limit).",
                                          default=None)
    max_completion_length: int = _help("Maximum completion tokens during training.", default=768)
    temperature: float = _help("Sampling temperature of training rollouts.", default=1.0)
    top_p: float = _help("Top-p of training rollouts, in (0, 1].", default=1.0)
    top_k: int = _help("Top-k of training rollouts (0: off; 1: greedy, for reproducibility checks).", default=0)
    max_pixels: int = _help("Pixel budget of training images (width x height).", default=320 * 28 * 28)
    eval_max_pixels: int = _help("Pixel budget of evaluation images.", default=480 * 28 * 28)
    rollout_engine: str = _help("auto (the fast engine on CUDA and the CPU, else stock), stock, fast or vllm.",
                                default="auto")
    importance_sampling_correction: str = _help(
        "TRL's correction of the gap between the sampler's and the training forward's token log-probabilities "
        "(its vllm_importance_sampling_*): off, or a mode weighting the loss by the ratio exp(train - sampler "
        "log-prob), capped at importance_sampling_cap: token_truncate (per token, capped; truncated importance "
        "sampling), sequence_truncate, token_mask, sequence_mask (ratios above the cap zeroed). Needs the "
        "sampler's log-probabilities: the fast engine or vllm, not stock generate.", default="off")
    importance_sampling_cap: float = _help("Upper bound C_max of the importance ratio of "
                                           "importance_sampling_correction, > 0 (TRL's default 3).", default=3.0)
    # --- logging, checkpoints, persistence -----------------------------------------------
    logging_steps: int = _help("Log every N optimizer steps.", default=10)
    save_steps: int = _help("Save a checkpoint every N optimizer steps.", default=50)
    save_total_limit: int = _help("Checkpoints kept locally and in the persistent store.", default=3)
    report_to: list = _help("Loggers: tensorboard, wandb (wandb only with a key or WANDB_MODE=offline).",
                            default_factory=lambda: ["tensorboard"])
    output_root: str = _help("Local folder of run folders.", default="runs")
    persistent_root: str | None = _help("Folder that survives the VM (auto: Drive on Colab, "
                                        "/kaggle/working on Kaggle, none locally; none: off).",
                                        default="auto")
    run_name: str | None = _help("Run folder name (None: from mode, model, dataset, subset, seed and a "
                                 "fingerprint of the training settings).", default=None)
    resume: bool = _help("Continue from the newest complete checkpoint if there is one.", default=True)
    resume_changed_config: bool = _help("Continue a run folder whose recorded training settings differ from "
                                        "these (e.g. a larger max_steps under the same run_name); its "
                                        "config.yaml then records the new settings.", default=False)
    num_processes: int = _help("Training processes (GPUs) for accelerate launch.", default=1)
    deepspeed: str | None = _help(
        "none (plain data parallel on several GPUs), zero3 (DeepSpeed ZeRO-3), or auto: zero3 for full "
        "fine-tuning, none for LoRA (each GPU holds the whole base model and runs the fast rollout engine).",
        default=None)
    # --- sampling and Pass@k -------------------------------------------------------------
    eval_dataset: str = _help("Dataset for sampling and evaluation.", default="synthetic")
    eval_split: str | None = _help("Split of eval_dataset (None: its default).", default=None)
    n_samples: int = _help("Samples per problem for Pass@k.", default=256)
    max_problems: int | None = _help("Problems to sample (None: all).", default=None)
    sample_temperature: float = _help("Sampling temperature for Pass@k.", default=0.6)
    sample_top_p: float = _help("Top-p for Pass@k sampling, in (0, 1].", default=0.95)
    sample_max_new_tokens: int = _help("Maximum new tokens per sample.", default=768)
    sample_chunk_size: int = _help("Samples generated at once per problem (halved on OOM).", default=64)
    passk_ks: list | None = _help("k values for Pass@k in 30_passk and a batch's comparison (None: 1, 2, 4, ..., "
                                  "n_samples).", default=None)
    bootstrap: int = _help("Bootstrap resamples for 95% intervals.", default=1000)

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_run_name(self) -> str:
        """The run folder name: mode, model, dataset, subset size, seed, then the fingerprint of every other
        training setting (:func:`training_fingerprint`), so two different experiments never share a folder."""
        if self.run_name:
            return self.run_name
        model = Path(self.vlm_name).name if ("/" in self.vlm_name or Path(self.vlm_name).exists()) \
            else self.vlm_name
        subset = "all" if self.subset_size is None else str(self.subset_size)
        return f"{self.mode}_{model}_{self.dataset_name}_n{subset}_s{self.seed}_{training_fingerprint(self)}"

    def run_dir(self) -> Path:
        return Path(self.output_root) / self.resolved_run_name()


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}

# Keys that do not change the trained weights: where data and runs live, how the run is executed (kernels,
# memory savers, rollout engine, DeepSpeed sharding: same mathematics), logged, checkpointed and persisted,
# and everything about sampling and Pass@k. Every other key is training-relevant, new keys included.
NOT_TRAINING_KEYS = frozenset({
    "data_dir", "full_determinism", "gradient_checkpointing", "verbose_rewards", "attn_implementation",
    "rollout_engine", "deepspeed",
    "logging_steps", "save_steps", "save_total_limit", "report_to",
    "output_root", "persistent_root", "run_name", "resume", "resume_changed_config",
    "eval_dataset", "eval_split", "eval_max_pixels", "n_samples", "max_problems", "sample_temperature",
    "sample_top_p", "sample_max_new_tokens", "sample_chunk_size", "passk_ks", "bootstrap",
})
TRAINING_KEYS = tuple(name for name in FIELDS if name not in NOT_TRAINING_KEYS)


def training_settings(cfg: RunConfig) -> dict[str, Any]:
    """The training-relevant keys of a configuration (everything that changes the trained weights)."""
    return {name: getattr(cfg, name) for name in TRAINING_KEYS}


def training_fingerprint(cfg: RunConfig) -> str:
    """8 hex digits of the sha256 of the training-relevant keys whose values differ from the built-in
    defaults (so adding a key with a default leaves existing fingerprints, and folder names, unchanged)."""
    default = RunConfig()
    changed = {k: v for k, v in training_settings(cfg).items() if v != getattr(default, k)}
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]


def field_help(name: str) -> str:
    return FIELDS[name].metadata.get("help", "")


def _field_type(name: str) -> Any:
    hints = typing.get_type_hints(RunConfig)
    return hints[name]


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check ``value`` against the field's type, converting where safe (int -> float, str -> number)."""
    tp = _field_type(name)
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args and (
        typing.get_origin(tp) in (typing.Union, types.UnionType)) else tp
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")
                         and base is not str):
        if optional:
            return None
        raise ConfigError(f"{source}: key '{name}' may not be empty (expected {base.__name__})")
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and optional:
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if base is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.replace("_", ""))
            raise TypeError
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value)
            raise TypeError
        if base is str:
            if isinstance(value, str):
                return value
            raise TypeError
        if base is list:
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else \
                    [v.strip() for v in value.split(",") if v.strip()]
                value = parsed
            if isinstance(value, (list, tuple)):
                return list(value)
            raise TypeError
        if base is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if isinstance(value, dict):
                return dict(value)
            raise TypeError
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    raise ConfigError(f"{source}: key '{name}' expects {getattr(base, '__name__', base)}, "
                      f"got {value!r} ({type(value).__name__})")


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """Read one parameters file into a dict; errors name the file (and line for YAML syntax)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameters file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["key=value", ...]`` (values parsed as YAML scalars) or a dict -> dict."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return {k: v for k, v in overrides.items() if v is not None}
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out[key.strip().replace("-", "_")] = value
    return out


def parameter_names(kind: str) -> list[str]:
    """Short names of the parameters files in ``parameters/<kind>/`` (modes, presets, platforms)."""
    return sorted(path.stem for path in (PARAMETERS_DIR / kind).glob("*.yaml"))


def resolve_parameter_file(name: str | Path, kind: str | None = None, source: str | None = None) -> Path:
    """A path, or a short name looked up in ``parameters/<kind>/<name>.yaml``; ``source`` (the flag or
    parameter that named it) begins the error message."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    folders = [kind] if kind else ["modes", "presets", "platforms"]
    for folder in folders:
        candidate = PARAMETERS_DIR / folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted(name for folder in folders for name in parameter_names(folder))
    where = f"{source}: " if source else ""
    raise ConfigError(f"{where}no parameters file named '{name}' in {', '.join(folders)} (known: {', '.join(known)})")


def load_config(files: list[str | Path] | None = None,
                overrides: list[str] | dict[str, Any] | None = None,
                override_source: str = "--set", flags: dict[str, Any] | None = None) -> RunConfig:
    """Build a validated RunConfig: YAML files (in order) < ``flags`` (command-line flags) < overrides."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers = [(read_yaml_file(f), str(f)) for f in (files or [])]
    layers.append((flags or {}, "command-line flag"))
    layers.append((parse_overrides(overrides), override_source))
    for data, source in layers:
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{source}: unknown key '{key}'" + _suggest(name))
            values[name] = _coerce(name, value, source)
            sources.pop(name, None)
            sources[name] = source  # insertion order: the key set last comes last
    config = RunConfig(**values)
    validate(config, sources)
    config._sources = sources  # type: ignore[attr-defined]
    return config


def _suggest(name: str) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(FIELDS), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def validate(cfg: RunConfig, sources: dict[str, str] | None = None) -> None:
    """Raise ConfigError naming the key (and its source) for every impossible value or combination."""
    sources = sources or {}

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{sources.get(key, 'default')}: key '{key}' {message}")

    def choice(key: str, allowed: tuple[str, ...]) -> None:
        if getattr(cfg, key) not in allowed:
            fail(key, f"must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")

    choice("mode", MODES)
    choice("loss_type", LOSS_TYPES)
    choice("correctness_from", CORRECTNESS_SOURCES)
    choice("finetune", FINETUNE_KINDS)
    choice("dtype", DTYPES)
    choice("rollout_engine", ROLLOUT_ENGINES)
    choice("importance_sampling_correction", IMPORTANCE_SAMPLING_MODES)
    if not (cfg.importance_sampling_cap > 0 and math.isfinite(cfg.importance_sampling_cap)):
        fail("importance_sampling_cap", f"must be a finite number > 0, got {cfg.importance_sampling_cap}")
    if cfg.importance_sampling_correction != "off" and cfg.rollout_engine == "stock":
        fail("importance_sampling_correction", f"is {cfg.importance_sampling_correction}, but rollout_engine stock "
                                               "(TRL's generate) returns no sampler log-probabilities to correct "
                                               "with; use rollout_engine auto, fast or vllm, or off")
    if cfg.deepspeed not in (None,) + DEEPSPEED_CHOICES:
        fail("deepspeed", f"must be {', '.join(DEEPSPEED_CHOICES)}, got {cfg.deepspeed!r}")
    positive = ["num_generations", "batch_size", "gradient_accumulation_steps", "max_completion_length",
                "logging_steps", "save_steps", "save_total_limit", "lora_r", "lora_alpha", "max_pixels",
                "eval_max_pixels", "n_samples", "sample_max_new_tokens", "sample_chunk_size", "bootstrap",
                "num_processes"]
    for key in positive:
        if getattr(cfg, key) < 1:
            fail(key, f"must be >= 1, got {getattr(cfg, key)}")
    for key in ("subset_size", "max_problems", "max_prompt_length"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            fail(key, f"must be >= 1 or None, got {getattr(cfg, key)}")
    if not (cfg.num_epochs > 0 and math.isfinite(cfg.num_epochs)):
        fail("num_epochs", f"must be > 0, got {cfg.num_epochs}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        fail("max_steps", f"must be -1 or >= 1, got {cfg.max_steps}")
    if not (cfg.learning_rate > 0):
        fail("learning_rate", f"must be > 0, got {cfg.learning_rate}")
    for key in ("temperature", "sample_temperature"):
        if not getattr(cfg, key) > 0:
            fail(key, f"must be > 0, got {getattr(cfg, key)}")
    for key in ("top_p", "sample_top_p"):
        if not 0 < getattr(cfg, key) <= 1:
            fail(key, f"must be in (0, 1], got {getattr(cfg, key)}")
    if cfg.top_k < 0:
        fail("top_k", f"must be >= 0, got {cfg.top_k}")
    if not 0 <= cfg.lora_dropout < 1:
        fail("lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 <= cfg.warmup_ratio < 1:
        fail("warmup_ratio", f"must be in [0, 1), got {cfg.warmup_ratio}")
    if not 0 < cfg.lambda_psr <= 1:
        fail("lambda_psr", f"must be in (0, 1], got {cfg.lambda_psr}")
    if cfg.beta < 0:
        fail("beta", f"must be >= 0, got {cfg.beta}")
    if cfg.epsilon_high is not None and not (cfg.epsilon_high > 0 and math.isfinite(cfg.epsilon_high)):
        fail("epsilon_high", f"must be > 0 or None, got {cfg.epsilon_high}")
    if cfg.loss_type == "cispo" and cfg.epsilon_high is not None and cfg.epsilon_high <= 1:
        fail("epsilon_high", f"is {cfg.epsilon_high}, but with loss_type cispo it caps the importance ratio "
                             f"weight itself: a cap <= 1 scales every on-policy gradient down (TRL recommends "
                             f"{CISPO_EPSILON_HIGH}; None uses that)")
    if cfg.correctness_from == "total" and "reward_threshold" not in sources:
        raise ConfigError(f"{sources.get('correctness_from', 'default')}: key 'correctness_from' is total, so key "
                          "'reward_threshold' must be set explicitly: it is then compared with the weighted total "
                          f"reward (0 to {MAX_TOTAL_REWARD} with unit weights; a well-formed wrong answer scores "
                          "about 10), and its default 0.5 is meant for the accuracy reward")
    if cfg.num_generations < 2:
        fail("num_generations", f"must be >= 2 (a group needs two completions; {cfg.mode} with "
                                f"{cfg.num_generations} has no group to compare), got {cfg.num_generations}")
    if cfg.passk_k < 1:
        fail("passk_k", f"must be >= 1, got {cfg.passk_k}")
    if cfg.mode == "passk" and cfg.passk_k >= cfg.num_generations:
        fail("passk_k", f"must be below num_generations = {cfg.num_generations} in mode passk (k = num_generations "
                        f"leaves each group one k-subset, so every advantage is 0), got {cfg.passk_k}")
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    if per_step % cfg.num_generations:
        # blame a key of the source that came last (a --set flag over a preset file); batch_size first
        group = ("batch_size", "gradient_accumulation_steps", "num_generations")
        set_keys = [k for k in sources if k in group]
        latest = [k for k in group if set_keys and sources.get(k) == sources[set_keys[-1]]]
        key = (latest or ["num_generations"])[0]
        fail(key, f"leaves a partial group: batch_size x "
                  f"gradient_accumulation_steps = {cfg.batch_size} x {cfg.gradient_accumulation_steps} = "
                  f"{per_step} completions per step is not divisible by num_generations = {cfg.num_generations}")
    if len(cfg.length_window) != 2 or not all(isinstance(v, (int, float)) for v in cfg.length_window) \
            or not 0 <= cfg.length_window[0] <= cfg.length_window[1]:
        fail("length_window", f"must be [min, max] words with 0 <= min <= max, got {cfg.length_window}")
    for name, weight in cfg.reward_weights.items():
        if name.removesuffix("_reward") not in REWARD_KEYS:
            fail("reward_weights", f"has unknown reward '{name}' (known: {', '.join(REWARD_KEYS)})")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            fail("reward_weights", f"weight of '{name}' must be a finite number, got {weight!r}")
    if not cfg.lora_target_modules and cfg.finetune == "lora":
        fail("lora_target_modules", "must name at least one module for LoRA")
    unknown_loggers = set(cfg.report_to) - {"tensorboard", "wandb", "none"}
    if unknown_loggers:
        fail("report_to", f"has unknown logger(s) {sorted(unknown_loggers)} (known: tensorboard, wandb, none)")
    if cfg.passk_ks is not None:
        bad = [k for k in cfg.passk_ks if not isinstance(k, int) or isinstance(k, bool) or k < 1]
        if bad or not cfg.passk_ks:
            fail("passk_ks", f"must be a non-empty list of integers >= 1, got {cfg.passk_ks}")
        above = [k for k in cfg.passk_ks if k > cfg.n_samples]
        if above:
            fail("passk_ks", f"has k values {above} above n_samples = {cfg.n_samples}")


def resolved_epsilon_high(cfg: RunConfig) -> float:
    """The upper clipping bound TRL gets: ``epsilon_high``, or TRL's recommendation for the loss type."""
    if cfg.epsilon_high is not None:
        return cfg.epsilon_high
    return CISPO_EPSILON_HIGH if cfg.loss_type == "cispo" else EPSILON


def save_resolved_config(cfg: RunConfig, folder: str | Path, name: str = "config.yaml",
                         extra: dict[str, Any] | None = None) -> Path:
    """Write the resolved configuration (and each key's source, and ``extra`` sections first) next to a
    run's outputs, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    body = {**(extra or {}), "config": cfg.to_dict(), "sources": getattr(cfg, "_sources", {})}
    tmp.write_text(yaml.safe_dump(body, sort_keys=False))
    tmp.replace(path)
    return path


def load_resolved_config(path: str | Path) -> RunConfig:
    """Read a config written by :func:`save_resolved_config`."""
    data = read_yaml_file(path)
    return load_config(overrides=data.get("config", data), override_source=str(path))


def describe(cfg: RunConfig) -> str:
    """The non-default keys of a configuration, one per line with their source."""
    default = RunConfig()
    sources = getattr(cfg, "_sources", {})
    lines = []
    for name in FIELDS:
        value = getattr(cfg, name)
        if value != getattr(default, name):
            lines.append(f"  {name:28s} {json.dumps(value)}  ({sources.get(name, 'default')})")
    return "Resolved configuration (non-default keys):\n" + ("\n".join(lines) or "  (all defaults)")


@dataclass
class StepEstimate:
    """Optimizer steps of a run and the arithmetic behind them."""

    problems: int
    completions_per_step: int
    steps_per_epoch: int
    total_steps: int

    def __str__(self) -> str:
        return (f"{self.problems} problems x G completions, {self.completions_per_step} completions per "
                f"optimizer step -> {self.steps_per_epoch} steps per epoch, {self.total_steps} steps in total")


def estimate_training_steps(cfg: RunConfig, problems: int, num_processes: int | None = None) -> StepEstimate:
    """steps = ceil(problems x G / (batch x grad_accum x processes)) x epochs.

    ``batch_size`` counts completions (TRL's per-device batch), so one optimizer step covers
    ``batch x grad_accum x processes / G`` problems. ``max_steps`` caps the result.
    """
    processes = num_processes or cfg.num_processes
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * processes
    per_epoch = math.ceil(problems * cfg.num_generations / per_step)
    total = math.ceil(per_epoch * cfg.num_epochs)
    if cfg.max_steps > 0:
        total = cfg.max_steps
    return StepEstimate(problems, per_step, per_epoch, total)
