"""load: check a local Hugging Face model folder and key it by its content.

The folder is not copied into the cache: the entry records the path and the sha256 of every
file that defines the model (config, weights, tokenizer), and the root key is computed from
those hashes, so any edit to the weights or config changes every key downstream.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ..arch import CONFIG_FILES, TOKENIZER_FILES, arch_for, sentence_pooling
from ..artifacts import artifact_record
from ..cache import Entry
from ..errors import ModelError
from ..gguf_import import gguf_record
from ..hashing import chain_key
from ..verify.result import Verification
from .base import Stage

SAFETENSORS_MAGIC_MAX_HEADER = 100 * 1024 * 1024


def _check_safetensors(path: Path) -> None:
    """Header sanity: the declared header fits the file and tensors end inside it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: truncated safetensors file ({size} bytes); copy the weights again")
        header_len = int.from_bytes(raw, "little")
        if header_len <= 0 or header_len > min(size - 8, SAFETENSORS_MAGIC_MAX_HEADER):
            raise ModelError(f"{path}: not a valid safetensors file (header length {header_len}, file {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise ModelError(f"{path}: safetensors header is not valid JSON; the file is damaged") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelError(
            f"{path}: truncated safetensors file: tensors need {8 + header_len + end} bytes, file has {size}; "
            "copy the weights again"
        )


def inspect_model(folder: Path, trust_remote_code: bool, config_only_ok: bool = False) -> dict[str, Any]:
    """Validate the folder without loading the model; return what the key and later stages need.

    With config_only_ok (planning), a folder with a config.json and no weights is accepted: the
    weights' size is estimated from the config and `config_only` is set."""
    if not folder.exists():
        raise ModelError(f"{folder}: model folder not found; set model.path in the recipe to a local Hugging Face "
                         "model folder (relative paths resolve against the recipe file)")
    if not folder.is_dir():
        raise ModelError(f"{folder}: model.path must be a folder, not a file")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder}: no config.json; this is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ModelError(f"{config_path}: not valid JSON ({exc})") from None
    if "auto_map" in config and not trust_remote_code:
        raise ModelError(
            f"{config_path}: this model needs its own Python code (auto_map); enginewright runs it only if the "
            "recipe sets model.trust_remote_code: true, after you have read that code"
        )
    arch = arch_for(config, str(config_path))
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and config_only_ok and arch.task == "causal-lm" and not any(folder.glob("*.bin")):
        return _config_only(folder, config, arch)
    if not weights:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(pickles)}: pickle weights are refused; convert them to safetensors)" if pickles else ""
        raise ModelError(f"{folder}: no *.safetensors weights{hint}")
    for w in weights:
        _check_safetensors(w)
    tokenizer = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not any(n in tokenizer for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        raise ModelError(f"{folder}: no tokenizer (tokenizer.json, tokenizer.model, vocab.json or vocab.txt); "
                         "save the tokenizer into the model folder with tokenizer.save_pretrained(folder)")
    files = [n for n in CONFIG_FILES if (folder / n).is_file()] + [w.name for w in weights] + tokenizer
    geometry = arch.geometry(config)
    pooling = None
    if arch.task == "feature-extraction":
        pooling = sentence_pooling(folder)
        files += [n for n in ("modules.json", "1_Pooling/config.json") if (folder / n).is_file()]
    return {
        "path": str(folder),
        "files": files,
        "task": arch.task,
        "pooling": pooling,
        "model_type": config["model_type"],
        "family": arch.family,
        "geometry": geometry.__dict__,
        "weights_bytes": sum(w.stat().st_size for w in weights),
        "dtype": str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        "source": gguf_record(folder) or {"source": "huggingface"},
    }


def _config_only(folder: Path, config: dict[str, Any], arch) -> dict[str, Any]:
    from ..memory import DTYPE_BYTES
    from ..sizing import parameter_count

    geometry = arch.geometry(config)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    params = parameter_count(config, geometry.__dict__)
    return {
        "path": str(folder),
        "files": [n for n in CONFIG_FILES if (folder / n).is_file()],
        "task": arch.task,
        "pooling": None,
        "model_type": config["model_type"],
        "family": arch.family,
        "geometry": geometry.__dict__,
        "weights_bytes": params.total * DTYPE_BYTES.get(dtype, 4),
        "dtype": dtype,
        "config_only": True,
    }


class LoadStage(Stage):
    name = "load"
    Config: ClassVar[type] = type(None)  # the recipe's model section (pipeline/recipe.py: ModelSpec)
    version = 1
    verified = False
    memory_factor = 1.3  # the model loaded in float32 to count and check it (measured 1.27 on 0.73 B)

    def __init__(self, spec, ctx):
        super().__init__(spec, ctx)
        self._info: dict[str, Any] | None = None
        self._hashes: dict[str, str] | None = None

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = inspect_model(self.ctx.model_path, self.spec.trust_remote_code,
                                       config_only_ok=self.ctx.planning)
        return self._info

    def plan_note(self) -> str | None:
        if self.info().get("config_only"):
            return ("config.json only: sizes estimated from the config; `run` needs the weights "
                    "(*.safetensors) and a tokenizer in the folder")
        return None

    def content_hashes(self) -> dict[str, str]:
        if self._hashes is None:
            folder = Path(self.info()["path"])
            memo = self.ctx.cache.memo
            self._hashes = {name: memo.sha256(folder / name) for name in self.info()["files"]}
            memo.save()
        return self._hashes

    def key_material(self, parent_key: str | None) -> dict[str, Any]:
        # the model's location does not matter, only its content
        return {"stage": self.name, "stage_version": self.version, "content": self.content_hashes(),
                "trust_remote_code": self.spec.trust_remote_code}

    def key(self, parent_key: str | None) -> str:
        return chain_key(self.key_material(parent_key))

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        info = dict(self.info())
        info["sha256"] = self.content_hashes()
        (out / "model.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return {"artifact": artifact_record("model"), "model": info}

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        model, _ = self.ctx.reference_model()
        n_params = sum(p.numel() for p in model.parameters())
        notes = ["loaded with transformers from safetensors"]
        source = meta["model"].get("source", {})
        if source.get("source") == "gguf":
            types = ", ".join(f"{k} {v}" for k, v in sorted(source["tensor_types"].items()))
            notes.append(f"weights dequantized to float32 from the GGUF file {source['file']} "
                         f"({source['file_type']}; tensors: {types}); sha256 {source['sha256'][:16]}…")
        return Verification(passed=True, metrics={"parameters": int(n_params)}, notes=notes)

    def describe(self, entry: Entry) -> str:
        return entry.meta.get("stage_meta", {}).get("model", {}).get("path", str(entry.path))
