"""The tree's rules, read from the source: no import cycle among qwen2vl's modules, and the model, quant/ and
generation code free of CPU decisions (those are made once, at load, in cpu/ and kernels/)."""

import ast
from pathlib import Path

import qwen2vl

ROOT = Path(qwen2vl.__file__).parent
# Modules that must hold no capability branch: no import of the native kernels or the CPU plan, no use of their names.
CPU_FREE = ["model.py", "text.py", "vision.py", "generate.py", "kv.py", "quant/__init__.py", "quant/formats.py",
            "quant/linear.py", "quant/writer.py"]
CPU_NAMES = {"kernels", "isa", "plan", "cpu_levels", "cpu_flags", "avx512", "avx2", "neon"}


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(name: str, f: Path, mods: dict[str, Path]) -> set[str]:
    """The qwen2vl modules `name` imports anywhere in its source (functions included)."""
    pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
            out |= subs if len(subs) == len(node.names) else subs | {target}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in mods and m != name}


def test_no_import_cycle():
    mods = modules()
    graph = {m: imports(m, f, mods) for m, f in mods.items()}
    done, cycles = set(), []

    def visit(m, path):
        if m in path:
            cycles.append(path[path.index(m):] + [m])
        elif m not in done:
            done.add(m)
            for d in graph[m]:
                visit(d, path + [m])

    for m in sorted(graph):
        visit(m, [])
    assert not cycles and len(graph) > 40


def test_model_quant_and_generation_hold_no_cpu_decision():
    mods = modules()
    for rel in CPU_FREE:
        name = "qwen2vl." + rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        f = ROOT / rel
        bad = {m for m in imports(name, f, mods) if m.startswith(("qwen2vl.kernels", "qwen2vl.cpu"))}
        names = {n.id for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Name)} | \
            {n.attr for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Attribute)}
        assert not bad and not names & CPU_NAMES, (rel, bad, names & CPU_NAMES)
