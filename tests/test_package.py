"""The package's shape: no import circles, and one home for each concept."""

import ast
from pathlib import Path

import finetune

PACKAGE = Path(finetune.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The package modules a module imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            out |= {n.split('.')[0] for n in names}
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('finetune.'):
            out.add(node.module.split('.')[1])
    return out


def test_no_module_imports_one_that_imports_it_back():
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob('*.py')}
    graph = {m: {d for d in deps if d in graph and d != '__init__'} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(m, path):
        state[m] = 'open'
        for d in sorted(graph[m]):
            if state.get(d) == 'open':
                cycles.append(path[path.index(d) :] + [d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 'done'

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_each_concept_has_one_home():
    import finetune.cli
    import finetune.precision

    homes = {
        'finetune.loss': [finetune.CausalLMLoss, finetune.loss.linear_cross_entropy, finetune.loss.HeadInput],
        'finetune.precision': [finetune.precision.resolve_precision, finetune.precision.autocast],
        'finetune.mix': [finetune.CorpusMix, finetune.mix.plan_mix, finetune.MixSampler, finetune.pack_corpora],
        'finetune.cache': [finetune.cache.atomic_folder, finetune.cache.cache_dir],
    }
    for module, objects in homes.items():
        assert all(o.__module__ == module for o in objects), module
    assert finetune.cli.PRECISIONS is finetune.precision.PRECISIONS  # one list of precision names


def test_folders_are_put_in_place_only_by_the_atomic_folder_helper():
    """Token stores, the embedded model and exports go through `cache.atomic_folder`, not hand-written renames."""
    for path in PACKAGE.glob('*.py'):
        calls = {
            f'{n.func.value.id}.{n.func.attr}'
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
        }
        found = calls & {'os.rename', 'os.replace', 'tempfile.mkdtemp', 'shutil.move'}
        assert path.name == 'cache.py' or not found, (path.name, found)


def test_the_readme_lists_every_module_in_an_order_the_imports_follow():
    """'How the code is laid out': every module once, and each imports only modules listed above it."""
    import re

    readme = (PACKAGE.parent / 'README.md').read_text()
    section = readme[readme.index('## How the code is laid out') :]
    section = section[: section.index('\n## ')]
    listed = [m for row in section.splitlines() if row.startswith('| `') for m in re.findall(r'`(\w+)\.py`', row)]
    modules = {p.stem for p in PACKAGE.glob('*.py')} - {'__init__'}
    assert sorted(listed) == sorted(modules)
    for i, module in enumerate(listed):
        later = imports_of(PACKAGE / f'{module}.py') & set(listed[i + 1 :])
        assert not later, f'{module}.py imports {sorted(later)}, listed below it'
