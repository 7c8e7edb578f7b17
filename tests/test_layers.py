"""The floors' rules, read from the source: what ``serve_app`` may import of ``deployments`` (only the
torch-free contract), and where diffusers' and peft's private names may be used (only the compat module).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = "deployments.contract"
COMPAT = ROOT / "deployments" / "engine" / "compat.py"
GPU_STACK = ("torch", "diffusers", "peft", "transformers", "torchao", "safetensors.torch")
# Roots whose private names are not diffusers' or peft's (torch._foreach_*, os._exit, ...).
OTHER_LIBRARIES = {"torch", "os", "sys"}


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_contract_and_the_ingress_import_no_gpu_stack():
    code = ("import sys, deployments.contract, serve_app.app, serve_app.ingress, serve_app.cli, serve_app.samples; "
            f"loaded = [m for m in {GPU_STACK!r} if m in sys.modules]; assert not loaded, loaded")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]


def _deployments_imports(path: Path) -> list[tuple[str, str]]:
    """(where, what) for each import of ``deployments`` in the file, as the module it names."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found += [(_where(path, node), a.name) for a in node.names if a.name.split(".")[0] == "deployments"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "deployments":  # from deployments import x: the module deployments.x
                found += [(_where(path, node), f"deployments.{a.name}") for a in node.names]
            elif node.module.split(".")[0] == "deployments":
                found.append((_where(path, node), node.module))
    return found


def test_serve_app_imports_only_the_contract_of_deployments():
    found = [hit for path in _modules("serve_app") for hit in _deployments_imports(path)]
    assert found, "no serve_app module imports deployments: the scan is broken"
    assert [(where, what) for where, what in found if what != CONTRACT] == []


def test_deployments_never_imports_serve_app():
    found = []
    for path in _modules("deployments"):
        for node in ast.walk(_tree(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            found += [(_where(path, node), n) for n in names if n.split(".")[0] == "serve_app"]
    assert found == []


def _private_uses(path: Path) -> list[tuple[str, str, str]]:
    """(where, kind, name) for each private name the file imports from diffusers or peft, and each private
    attribute it reads or writes (``x._y``, ``getattr(x, "_y")``) on something other than torch/os/sys."""
    uses = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] not in ("diffusers", "peft") or (isinstance(node, ast.ImportFrom) and node.level):
                    continue
                uses += [(_where(path, node), "module", part) for part in module.split(".") if _private(part)]
                if isinstance(node, ast.ImportFrom):
                    uses += [(_where(path, node), "import", a.name) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if not (isinstance(root, ast.Name) and root.id in OTHER_LIBRARIES):
                uses.append((_where(path, node), "attribute", node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            uses.append((_where(path, node), "attribute", node.args[1].value))
    return uses


def _own_private_names() -> set[str]:
    """Private names our own code defines: functions, classes, variables, and attributes set on self/cls."""
    own = set()
    for folder in ("deployments", "serve_app", "tests"):
        for path in _modules(folder):
            if path == COMPAT:
                continue
            for node in ast.walk(_tree(path)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    own.add(node.name)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    own.add(node.id)
                elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                      and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    own.add(node.attr)
    return {name for name in own if _private(name)}


def test_private_diffusers_and_peft_names_are_used_only_in_the_compat_module():
    compat_names = {name for _, _, name in _private_uses(COMPAT)}
    assert {"_attention_backend", "_create_lora_config", "_cp_plan"} <= compat_names, "the scan is broken"
    own = _own_private_names()
    leaks = []
    for path in _modules("deployments") + _modules("serve_app"):
        if path == COMPAT:
            continue
        for where, kind, name in _private_uses(path):
            # A name the compat module uses on diffusers/peft objects, an import of a private diffusers or
            # peft name, or a private attribute that none of our own code defines: it belongs in compat.
            if kind != "attribute" or name in compat_names or name not in own:
                leaks.append((where, kind, name))
    assert leaks == [], f"move these into {COMPAT.relative_to(ROOT)}"
