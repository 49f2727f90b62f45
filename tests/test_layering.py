"""The package's imports point down: every ``ec2moe_jax`` subpackage imports only from the
layers below it (or from itself), so the library never depends on ``bench/`` or the CLI.

The walk is over the AST of every source file, so a lazy import inside a function counts as
much as one at the top of the module.
"""

import ast
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ec2moe_jax"

# Lower rank = lower layer. A module may import its own subpackage or any of lower rank.
LAYERS = [
    {"config", "files"},
    {"sharding", "data"},
    {"kernels"},  # compute kernels the layers call (the CPU matvec)
    {"routing", "codec", "profiles"},
    {"layers"},
    {"models"},
    {"selection"},
    {"scheduler"},
    {"training"},
    {"pipeline"},
    {"serving"},
    {"bench"},
    {"__init__"},  # the public API (ec2moe_jax.load_hf, ...)
    {"cli"},  # the `ec2moe` console script, the only user of bench besides bench
    {"__main__"},  # python -m ec2moe_jax
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(path: pathlib.Path, root: pathlib.Path) -> str:
    """The layer a file belongs to: its subpackage, or its module name at the top level."""
    parts = path.relative_to(root).with_suffix("").parts
    return parts[0]


def _imported_units(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, first name below ec2moe_jax) of every absolute ec2moe_jax import."""
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ec2moe_jax":  # from ec2moe_jax import data, load_hf, ...
                names = [a.name if a.name in RANK else "__init__" for a in node.names]
            elif node.module.startswith("ec2moe_jax."):
                names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names
                     if a.name.startswith("ec2moe_jax.")]
        out += [(node.lineno, n) for n in names]
    return out


def upward_imports(root: pathlib.Path) -> list[str]:
    """Every import in ``root`` (the package folder) that points up or sideways, as
    ``"file:line: unit imports target"``."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        unit = _unit(path, root)
        rank = RANK.get(unit)
        rel = path.relative_to(root.parent)
        if rank is None:
            bad.append(f"{rel}: {unit!r} has no layer; add it to LAYERS in {__file__}")
            continue
        for line, target in _imported_units(ast.parse(path.read_text(), str(path))):
            if target == unit:
                continue
            if target not in RANK:
                bad.append(f"{rel}:{line}: imports unknown ec2moe_jax.{target}")
            elif RANK[target] >= rank:
                bad.append(f"{rel}:{line}: {unit} (layer {rank}) imports {target} "
                           f"(layer {RANK[target]}): imports must point down")
    return bad


def test_imports_point_down():
    bad = upward_imports(PACKAGE)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    # A copy of the package with one library module importing bench must be refused, with
    # the offending file named.
    pkg = tmp_path / "ec2moe_jax"
    (pkg / "scheduler").mkdir(parents=True)
    (pkg / "bench").mkdir()
    (pkg / "scheduler" / "plan.py").write_text("def f():\n    from ec2moe_jax.bench import sim\n")
    (pkg / "bench" / "sim.py").write_text("from ec2moe_jax.scheduler import plan\n")
    bad = upward_imports(pkg)
    assert bad == ["ec2moe_jax/scheduler/plan.py:2: scheduler (layer 7) imports bench "
                   "(layer 11): imports must point down"]


def test_every_subpackage_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    found.add("ec2moe_jax.configs")  # installed from the top-level configs/ folder
    assert found - listed == set(), f"add {sorted(found - listed)} to pyproject.toml"


def test_named_configs_install_under_the_package_not_top_level(tmp_path):
    # Run from an empty folder so the repository root is not on sys.path.
    code = ("import importlib, importlib.util; print(importlib.util.find_spec('configs') is None);"
            "print(importlib.import_module('ec2moe_jax.configs.small').__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out[0] == "True", "configs/ must not install as a top-level package"
    assert pathlib.Path(out[1]).resolve() == ROOT / "configs" / "small.py"


def test_top_level_api_resolves_without_importing_jax_first():
    code = ("import sys, ec2moe_jax; light = 'jax' not in sys.modules; "
            "missing = [n for n in ec2moe_jax.__all__ if getattr(ec2moe_jax, n) is None]; "
            "print(light, missing)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "True []"
    import ec2moe_jax

    for name in ("load_hf", "MoELM", "load_config", "schedule", "make_replanner",
                 "build_stages", "EndEngine", "CloudEngine"):
        assert name in ec2moe_jax.__all__
