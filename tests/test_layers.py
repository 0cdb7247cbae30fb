"""The layers' import rule (tests/layers.py): nothing points up, no circles, and a function-local import of the
project says why on its line. The rule is checked on the tree, and on fake modules that break it."""

import layers
import pytest


def _imports(sources: dict[str, str]):
    modules = set(sources)
    found = []
    for name, text in sources.items():
        found += layers.imports_of(name, text, modules, is_package=False)
    return found


def test_no_import_points_up():
    found, _ = layers.read_tree()
    up = sorted({f"{i.source}:{i.line} -> {i.target}" for i in found if layers.points_up(i)})
    assert up == [], "imports that point up (core < measures < causal < views < cli; training: core and measures):\n" + "\n".join(up)


def test_no_circles():
    found, _ = layers.read_tree()
    assert layers.circles(layers.import_graph(found)) == []


def test_function_local_imports_say_why():
    found, _ = layers.read_tree()
    bare = sorted({f"{i.source}:{i.line} -> {i.target}" for i in found
                   if i.local and not i.reason and i.source.split(".")[0] in layers.LOCAL_RULE})
    assert bare == [], "function-local project imports without a comment saying why:\n" + "\n".join(bare)


def test_exceptions_are_still_needed():
    """An allowed upward import that is gone leaves its exception behind: remove it from the rule."""
    found, _ = layers.read_tree()
    present = {(i.source, i.target) for i in found}
    assert set(layers.EXCEPTIONS) <= present


@pytest.mark.parametrize("source, target, up", [
    ("interp.core.runs", "interp.views.tables", True),       # core importing a view
    ("interp.core.store", "interp.divergence", True),         # core importing a measure
    ("interp.lens", "interp.causal.sites", True),             # a measure importing causal
    ("interp.causal.fourway", "interp.cli.options", True),    # causal importing the CLI
    ("interp.views.report", "interp.cli", True),
    ("training.trainer", "interp.views.plots", True),         # training may not import views
    ("training.study.results", "interp.views.plots", True),   # ... the study's results neither
    ("training.__main__", "interp.views.plots", False),       # its command line may (it writes the figures)
    ("training.trainer", "interp.causal.fourway", True),      # ... nor causal
    ("interp.lens", "training.tasks", True),                  # interp never imports training
    ("interp.cli.causal", "interp.views.causal", False),
    ("interp.views.report", "interp.causal.artifacts", False),
    ("interp.causal.fourway", "interp.lens", False),
    ("interp.lens", "interp.core.models", False),
    ("training.trainer", "interp.core.runs", False),
    ("training.evaluate", "interp.analysis", False),
    ("apps.layers", "interp.cli", False),
    ("bench.capture", "interp.views.plots", False),
])
def test_the_rule_can_fail(source, target, up):
    sources = {source: f"import {target}\n", target: ""}
    [imp] = _imports(sources)
    assert layers.points_up(imp) is up


def test_the_reader_sees_local_imports_reasons_and_circles():
    sources = {
        "interp.a": "from interp.b import x\n\ndef f():\n    from interp.c import y\n    import interp.d  # heavy: loads torch\n",
        "interp.b": "from interp import a\n",
        "interp.c": "from . import d\n",
        "interp.d": "",
    }
    found = _imports(sources)
    by_target = {(i.source, i.target): i for i in found}
    assert not by_target[("interp.a", "interp.b")].local
    assert by_target[("interp.a", "interp.c")].local and not by_target[("interp.a", "interp.c")].reason
    assert by_target[("interp.a", "interp.d")].reason == "heavy: loads torch"
    assert ("interp.c", "interp.d") in by_target  # a relative import, resolved
    assert layers.circles(layers.import_graph(found)) == [["interp.a", "interp.b"]]
