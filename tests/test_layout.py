"""The layout rules: no stage imports another stage, verify/ does not import stages/, each stage owns
its config, and the registries are the only place a stage, method or backend is listed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"


def runtime_imports(path: Path) -> set[str]:
    """Modules a file imports when it runs (imports under `if TYPE_CHECKING:` are for annotations only)."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for child in node.body for n in ast.walk(child))
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


STAGE_FILES = sorted(p for p in (PACKAGE / "stages").glob("*.py") if p.stem not in ("__init__", "base", "onnx_stage"))


@pytest.mark.parametrize("path", STAGE_FILES, ids=[p.stem for p in STAGE_FILES])
def test_no_stage_imports_another_stage(path):
    others = {f"pipeline.stages.{p.stem}" for p in STAGE_FILES if p != path}
    assert not runtime_imports(path) & others


@pytest.mark.parametrize("path", sorted((PACKAGE / "verify").glob("*.py")), ids=lambda p: p.stem)
def test_verify_does_not_import_stages(path):
    assert not {m for m in runtime_imports(path) if m.startswith("pipeline.stages")}


def test_every_registered_stage_owns_a_config_named_config():
    from pipeline.registry import recipe_stage_classes

    for key, cls in recipe_stage_classes().items():
        config = cls.Config
        assert config.__name__.endswith("Config"), key
        assert config.__module__ == cls.__module__, f"{key}: its config lives beside it"
        assert config.__name__ != cls.__name__


def test_recipe_methods_are_the_method_registry():
    from pipeline.quant.methods import METHODS
    from pipeline.recipe import stage_config

    field = stage_config("quantize").model_fields["method"]
    assert set(field.annotation.__args__) == set(METHODS)
    for method in METHODS.values():
        module, _, func = method.build_ref.partition(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func)), method.name
