"""The peers a user would pick instead, built the way their own documentation says:
onnxruntime-genai's model builder, and Hugging Face Optimum's ORTModelForCausalLM in a virtual
environment of its own (optimum-onnx needs transformers < 4.58)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

OPTIMUM_REQUIREMENTS = ["optimum-onnx[onnxruntime]==0.1.0", "transformers<4.58", "onnxruntime==1.31.1"]


def genai_engine(model_dir: Path, precision: str, out: Path, say: Callable[[str], None]) -> Path | None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return None
    target = out / "genai" / f"{model_dir.name}-{precision}"
    if not (target / "genai_config.json").is_file():
        say(f"building onnxruntime-genai {precision} for {model_dir.name}")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(tmp),
                        "-p", precision, "-e", "cpu", "-c", str(out / "genai" / ".hf-cache")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    return target


def genai_threads(folder: Path, threads: int) -> Path:
    """A view of a genai folder whose config pins the thread count and turns spinning off."""
    view = folder.with_name(f"{folder.name}-t{threads}")
    view.mkdir(exist_ok=True)
    for f in folder.iterdir():
        link = view / f.name
        if f.name != "genai_config.json" and not link.exists():
            link.symlink_to(f.resolve())
    config = json.loads((folder / "genai_config.json").read_text())
    session = config["model"]["decoder"].setdefault("session_options", {})
    session["intra_op_num_threads"] = threads
    session["inter_op_num_threads"] = 1  # spinning stays as onnxruntime-genai sets it (its config has no key for it)
    (view / "genai_config.json").write_text(json.dumps(config, indent=2))
    return view



def optimum_python(out: Path, say: Callable[[str], None]) -> Path | None:
    """The Python of a virtual environment holding Optimum, created on first use (None if pip fails)."""
    root = out / ".venvs" / "optimum"
    python = root / "bin" / "python"
    stamp = root / ".installed"
    if stamp.is_file():
        return python
    say("creating the Optimum virtual environment (first run only)")
    shutil.rmtree(root, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(root)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    try:
        subprocess.run(pip + ["torch==2.13.0"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        subprocess.run(pip + ["-c", "/dev/stdin", *OPTIMUM_REQUIREMENTS], input=b"torch==2.13.0\n", check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except subprocess.CalledProcessError as exc:
        say(f"Optimum could not be installed: {exc.stderr.decode(errors='replace')[-300:]}")
        return None
    stamp.write_text(" ".join(OPTIMUM_REQUIREMENTS) + "\n")
    return python


def optimum_engine(model_dir: Path, out: Path, say: Callable[[str], None]) -> tuple[Path, Path] | None:
    """(python, exported folder) for Optimum's ONNX export of the model, or None if unavailable."""
    python = optimum_python(out, say)
    if python is None:
        return None
    target = out / "optimum" / model_dir.name
    if not (target / "model.onnx").is_file():
        say(f"exporting {model_dir.name} with Optimum")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([str(python), "-m", "optimum.exporters.onnx", "--model", str(model_dir), "--task",
                               "text-generation-with-past", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0 or not (tmp / "model.onnx").is_file():
            say(f"Optimum export failed: {proc.stderr[-300:]}")
            return None
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    return python, target
