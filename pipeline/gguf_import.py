"""GGUF files (llama.cpp's format) as a model source: converted once into a Hugging Face folder.

transformers' GGUF loader dequantizes every tensor (Q4_1, Q8_0, ... into float32) and maps the
llama.cpp names and tokenizer onto the Hugging Face architecture. The folder it saves is a cache
entry keyed by the GGUF's sha256 and the versions of the converting libraries, built in `.tmp/`
and renamed into place like any other entry (manifest, corruption check on every read), so a
second run, or a second recipe on the same file, converts nothing.

The converted weights are the GGUF's quantized values in float: the model is what the GGUF
computes, not the checkpoint it was quantized from. `gguf.json` in the folder records from which
file and quantization type they came, and the load stage reports it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cache import ArtifactCache
from .errors import ModelError
from .hashing import chain_key
from .target import package_version

IMPORT_VERSION = 1
RECORD = "gguf.json"
TOOLS = ("transformers", "gguf", "torch", "safetensors")


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def gguf_summary(path: Path) -> dict[str, Any]:
    """Architecture, llama.cpp file type and tensor types of a GGUF, from its header (memory-mapped)."""
    try:
        from gguf import GGUFReader, LlamaFileType
    except ImportError:
        raise ModelError(f"{path}: reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors, ... on a damaged file
        raise ModelError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.parts[f.data[0]]

    arch = field("general.architecture")
    file_type = field("general.file_type")
    try:
        file_type_name = LlamaFileType(int(file_type[0])).name if file_type is not None else None
    except ValueError:
        file_type_name = f"unknown ({int(file_type[0])})"
    return {"architecture": bytes(arch).decode() if arch is not None else None, "file_type": file_type_name,
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
            "tensors": len(reader.tensors)}


def import_key(sha256: str) -> str:
    return chain_key({"import": "gguf", "version": IMPORT_VERSION, "sha256": sha256,
                      "tools": {t: package_version(t) for t in TOOLS}})


def import_gguf(path: Path, cache: ArtifactCache, say: Callable[[str], None] = lambda msg: None) -> Path:
    """The Hugging Face folder converted from the GGUF at `path` (converted now unless cached)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file not found; set model.path to a .gguf file, a Hugging Face folder, "
                         "or package:<module>/<file>.gguf")
    digest = cache.memo.sha256(path)
    cache.memo.save()
    key = import_key(digest)
    entry = cache.lookup(key)
    if entry is not None:
        return entry.path
    cache.root.mkdir(parents=True, exist_ok=True)
    with cache.lock(key):
        entry = cache.lookup(key)  # another process may have converted it meanwhile
        if entry is not None:
            return entry.path
        summary = gguf_summary(path)
        say(f"converting {path.name} ({summary['file_type']}, {summary['architecture']}) into a Hugging Face folder")
        with cache.building(key) as tmp:
            started = time.perf_counter()
            _convert(path, tmp)
            record = {"source": "gguf", "file": path.name, "sha256": digest, **summary,
                      "dequantized_to": "float32", "seconds": round(time.perf_counter() - started, 3),
                      "tools": {t: package_version(t) for t in TOOLS}}
            (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            entry = cache.commit(key, tmp, {"stage": "import", "key": key, "import": record, "created": time.time(),
                                            "recipe": f"import:{path.name}"})
    return entry.path


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    model: Any
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise ModelError(f"{path}: transformers cannot convert this GGUF ({type(exc).__name__}: {exc}); its "
                         "GGUF loader supports the llama, mistral, qwen2, qwen3, phi3, gemma2/3 and a few other "
                         "architectures") from None
    # the loaded model remembers it came from GGUF, which save_pretrained refuses: it is a plain float model now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with torch.no_grad():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model


def resolve_model_source(path: Path, cache: ArtifactCache, say: Callable[[str], None] = lambda msg: None) -> Path:
    """The Hugging Face folder for a recipe's model path: the path itself, or a GGUF file's converted folder."""
    if is_gguf(path):
        return import_gguf(path, cache, say)
    return path


def gguf_record(folder: Path) -> dict[str, Any] | None:
    record = folder / RECORD
    return json.loads(record.read_text()) if record.is_file() else None
