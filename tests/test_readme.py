"""README.md tells the truth about the CLI: every option and preset is documented."""
import dataclasses
import os
import re
import subprocess

from distill.config import DistillConfig, _flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_every_train_option_is_documented():
    missing = [_flag(f) for f in dataclasses.fields(DistillConfig) if f"`{_flag(f)}`" not in README]
    assert not missing


def test_every_evaluate_option_is_documented():
    from distill.evaluate import build_parser

    flags = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    assert not [f for f in sorted(flags) if f not in README]


def test_every_launch_preset_is_documented():
    text = subprocess.run(["bash", "launch.sh", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    presets = re.findall(r"^  ([a-z0-9][a-z0-9_-]*)\s{2,}\S", text, flags=re.M)
    assert len(presets) >= 14
    assert not [p for p in presets if f"| {p} |" not in README]


def test_quick_start_commands_and_no_placeholders():
    assert "bash launch.sh" in README and "python -m pytest -q -n 2 tests" in README
    assert not re.search(r"\b[A-Z]+_(SECTION|TABLE)\b", README)


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    # exactly the README's command (quick start and "Tests")
    assert re.search(r"^python -m pytest -q -n 2 tests$", ci, flags=re.M)
    assert "\npython -m pytest -q -n 2 tests\n" in README


def test_every_benchmark_option_is_documented():
    import sys

    for module in ("kernels.bench", "distill.bench_step"):
        text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
        flags = set(re.findall(r"(--[a-z][a-z-]*)", text)) - {"--help"}
        assert len(flags) >= 9, (module, flags)
        assert not [f for f in sorted(flags) if f"`{f}" not in README], module


ARCHITECTURE = open(os.path.join(ROOT, "ARCHITECTURE.md"), encoding="utf-8").read()


def _modules():
    import pathlib

    root = pathlib.Path(ROOT)
    return sorted(str(p.relative_to(root)) for folder in ("distill", "kernels")
                  for p in (root / folder).rglob("*.py"))


def test_architecture_lists_every_module_and_only_existing_ones():
    listed = set(re.findall(r"`((?:distill|kernels)/[\w/]+\.py)`", ARCHITECTURE))
    modules = set(_modules())
    assert not modules - listed, "modules missing from ARCHITECTURE.md"
    assert not listed - modules, "ARCHITECTURE.md lists modules that do not exist"


def _imports(path):
    """(module imported, names imported from it) for every import of this project in `path`."""
    import ast

    package = path.replace("/", ".")[:-3].rsplit(".", 1)[0]
    if path.endswith("__init__.py"):
        package = path.replace("/", ".")[: -len(".__init__.py")]
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.split(".")[0] in ("distill", "kernels"):
                yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("distill", "kernels"):
                    yield alias.name, []


def test_kernels_import_nothing_from_distill_and_no_private_names_cross_modules():
    for path in _modules():
        own = path.replace("/", ".")[:-3]
        for module, names in _imports(path):
            if path.startswith("kernels/"):
                assert not module.startswith("distill"), (path, module)
            # no private name crosses modules (a package's __init__ may re-export its own)
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private or own.endswith("__init__"), (path, module, private)
            # a package's private modules (kernels._core, kernels._bench_worker) serve it alone
            assert not (module.rsplit(".", 1)[-1].startswith("_") and module.split(".")[0] != own.split(".")[0]), \
                (path, module)


def test_distill_imports_form_no_cycle():
    graph = {}
    for path in _modules():
        if not path.startswith("distill/"):
            continue
        own = path[:-3].replace("/", ".").removesuffix(".__init__")
        deps = set()
        for module, names in _imports(path):
            if module == "distill":
                deps.update(f"distill.{n}" for n in names)
            elif module.startswith("distill."):
                deps.add(module)
        graph[own] = {d for d in deps if d != own and not own.startswith(d + ".") and not d.startswith(own + ".")}
    # a package and its submodules count as one node
    node = lambda m: "distill.models" if m.startswith("distill.models") else m
    edges = {}
    for m, deps in graph.items():
        edges.setdefault(node(m), set()).update(node(d) for d in deps if node(d) != node(m))
    seen, stack = {}, []

    def visit(m):
        seen[m] = "open"
        stack.append(m)
        for d in edges.get(m, ()):
            assert seen.get(d) != "open", " -> ".join(stack + [d])
            if d not in seen:
                visit(d)
        seen[m] = "done"
        stack.pop()

    for m in sorted(edges):
        if m not in seen:
            visit(m)
