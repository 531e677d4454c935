"""Names a run can ask for, checked without torch, transformers or datasets: the model registry, the
dataset catalog, and the check of a configuration's names before any slow work starts.

``nbhelpers.models`` loads the models named here and ``nbhelpers.data`` registers a loader for every
dataset here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, RunConfig
from .errors import InputError


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: where the weights come from and what kind of model it is."""

    name: str
    source: str  # hub | random | asset (a folder in nbhelpers/assets)
    hub_id: str | None
    description: str


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "qwen2-5-3b": ModelSpec("qwen2-5-3b", "hub", "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL 3B Instruct"),
    "qwen2-5-7b": ModelSpec("qwen2-5-7b", "hub", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL 7B Instruct"),
    "tiny-random": ModelSpec("tiny-random", "random", None,
                             "offline Qwen2.5-VL, <1M random parameters, 512-token byte vocabulary"),
    "qwen2-5-3b-random": ModelSpec("qwen2-5-3b-random", "random", None,
                                   "Qwen2.5-VL-3B architecture, random weights (benchmarks)"),
    "tiny-pretrained": ModelSpec("tiny-pretrained", "asset", None,
                                 "offline Qwen2.5-VL (6M parameters) pretrained by chartrl on synthetic charts"),
}
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def asset_dir(name: str) -> Path:
    """The folder of a shipped (asset) model."""
    return ASSETS_DIR / name


def resolve_model(name: str, key: str = "vlm_name") -> tuple[str, str]:
    """Registry name, local folder or hub id -> (kind, location), kind hub, random, asset or local.
    InputError naming ``key`` (the key or flag that gave the name) otherwise."""
    if name in MODEL_REGISTRY:
        spec = MODEL_REGISTRY[name]
        if spec.source == "asset":
            folder = asset_dir(name)
            if not (folder / "config.json").is_file():
                raise InputError(f"{key} '{name}': its shipped weights are missing from {folder} "
                                 f"(regenerate them with tools/pretrain_tiny.py)")
            return ("asset", str(folder))
        return (spec.source, spec.hub_id or name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise InputError(f"{key} '{name}': folder has neither config.json nor adapter_config.json")
        return ("local", str(path))
    if "/" in name and not path.exists() and not name.startswith((".", "/")):
        return ("hub", name)
    raise InputError(f"{key} '{name}' is neither a registered model ({', '.join(MODEL_REGISTRY)}) "
                     f"nor an existing folder")


@dataclass(frozen=True)
class DatasetCard:
    """What is known about a registered dataset before loading it."""

    name: str
    source: str  # "hub", "local" or "synthetic"
    hub_id: str | None
    default_split: str
    splits: tuple[str, ...]
    description: str
    default_subset_size: int | None = None  # used when load_examples gets subset_size=None


DATASET_CATALOG: dict[str, DatasetCard] = {card.name: card for card in (
    DatasetCard("chart-rvr-train", "hub", "sanchit97/chart-rvr-grpo-train", "train", ("train",),
                "Chart-RVR GRPO training set (34,194 rows; reasoning, chart type and table, some null)."),
    DatasetCard("chartqa", "hub", "HuggingFaceM4/ChartQA", "test", ("train", "val", "test"),
                "ChartQA, human and augmented questions (subset); data_dir reads the original files."),
    DatasetCard("chartqa-pro", "hub", "ahmed-masry/ChartQAPro", "test", ("test",),
                "ChartQA-Pro, 1,948 questions; conversational history in the question; subset = Question Type."),
    DatasetCard("plotqa", "local", None, "test", ("train", "val", "test"),
                "PlotQA from local qa_pairs_V2.json and png files; a seeded 5,000 by default.",
                default_subset_size=5000),
    DatasetCard("chartfc", "local", None, "test", ("train", "valid", "test"),
                "ChartFC claims as yes/no questions, from local JSON and images."),
    DatasetCard("evochart", "local", None, "test", ("test",),
                "EvoChart-QA from local EvoChart-QA.json and png files."),
    DatasetCard("chartbench", "local", None, "test", ("test",),
                "ChartBench test.jsonl, one example per conversation turn; subset = task."),
    DatasetCard("synthetic", "synthetic", None, "train", ("train", "test", "pretrain"),
                "Offline matplotlib charts of seeded random tables (64 by default).",
                default_subset_size=64),
)}
DATASET_NAMES = tuple(DATASET_CATALOG)


def check_dataset_names(names, source: str) -> None:
    """InputError naming ``source`` for the first name that is not a registered dataset."""
    for name in names:
        if name not in DATASET_CATALOG:
            raise InputError(f"{source}: unknown dataset {name!r} (known: {', '.join(DATASET_NAMES)})")


def check_names(cfg: RunConfig) -> None:
    """ConfigError naming the key and its source when ``vlm_name``, ``dataset_name``, ``eval_dataset``
    or ``eval_split`` names nothing that exists; needs no model or data library."""
    sources = getattr(cfg, "_sources", {})

    def where(key: str) -> str:
        return sources.get(key, "default")

    try:
        resolve_model(cfg.vlm_name, key="key 'vlm_name':")
    except InputError as error:
        raise ConfigError(f"{where('vlm_name')}: {error}") from None
    for key in ("dataset_name", "eval_dataset"):
        name = getattr(cfg, key)
        if name not in DATASET_CATALOG:
            raise ConfigError(f"{where(key)}: key '{key}' names no registered dataset: {name!r} "
                              f"(known: {', '.join(DATASET_NAMES)})")
    splits = DATASET_CATALOG[cfg.eval_dataset].splits
    if cfg.eval_split is not None and cfg.eval_split not in splits:
        raise ConfigError(f"{where('eval_split')}: key 'eval_split' must be one of {', '.join(splits)} for "
                          f"{cfg.eval_dataset}, got {cfg.eval_split!r}")
