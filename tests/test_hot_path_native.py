"""What the compiled hot path must not quietly run as Python (portway/build_info.py's HOT_PATH).

mypyc compiles a module's functions and classes, but three things in them still run in the interpreter, on every
request that touches them: the ``__init__`` that ``@dataclass`` writes (generated at import time), a module
constant that is not ``Final`` (read through the module's dict each time), and every method call on an instance of
an interpreted subclass. Each cost the relay microseconds per request before it was found. These checks read the
source, so they run on the pure-Python build too.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

import portway
from portway.build_info import HOT_PATH

# Dataclasses of the hot-path modules built once per relay, per link or per tunnel, not per request or frame: their
# generated __init__ costs nothing that matters. Any other dataclass there writes its own.
BUILT_RARELY = {
    "portway.proto.http1.MessageEnd",  # one instance, MESSAGE_END
    "portway.proto.mux.MuxConfig",
    "portway.proto.resume.ResumeEntry",
    "portway.proto.resume.ResumeList",
    "portway.proto.routing.ToRelay",  # one instance, TO_RELAY
    "portway.proto.routing.ToTunnel",  # routes are cached per Host value (Router.route)
    "portway.proto.routing.NotServed",
    "portway.relay.front.FrontServices",
    "portway.relay.tunnels.AccessPolicy",
}


def source_of(module_name: str) -> str:
    """The module's Python source (a compiled module has no source inspect can find)."""
    path = Path(portway.__file__).parent.joinpath(*module_name.split(".")[1:]).with_suffix(".py")
    return path.read_text()


def hot_dataclasses():
    for name in HOT_PATH:
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and dataclasses.is_dataclass(cls):
                yield f"{name}.{cls.__qualname__}", cls


def test_the_rarely_built_list_names_real_dataclasses():
    assert BUILT_RARELY <= {name for name, _ in hot_dataclasses()}


@pytest.mark.parametrize("name, cls", [pytest.param(name, cls, id=name) for name, cls in hot_dataclasses()
                                        if name not in BUILT_RARELY])
def test_hot_dataclasses_write_their_own_init(name, cls):
    source = source_of(cls.__module__)
    decorator = re.search(rf"@dataclass\(([^)]*)\)\nclass {cls.__name__}\b", source)
    assert decorator is not None and "init=False" in decorator.group(1), (
        f"{name}: @dataclass(init=False) and a hand-written __init__ (the generated one runs as Python)")
    assert "__init__" in cls.__dict__


@pytest.mark.parametrize("name", HOT_PATH)
def test_hot_module_constants_are_final(name):
    """A module-level UPPER_CASE (or _UPPER_CASE) name bound once is a constant: Final, so mypyc inlines it."""
    tree = ast.parse(source_of(name))
    plain = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            annotation = ast.unparse(node.annotation)
            targets = [] if annotation.startswith("Final") else [node.target.id]
        else:
            continue
        plain += [target for target in targets
                  if re.fullmatch(r"_?[A-Z][A-Z0-9_]*", target) and target != "__all__"]
    # re-exported from portway.metrics, whose constants another compiled module reads at import time: Final there
    # leaves them unset when that module is imported first (mypyc: "value for final name was not set")
    exempt = {"STATUS_CLASSES", "DURATION_BUCKETS"} if name == "portway.metrics" else set()
    assert set(plain) - exempt == set(), f"{name}: make these Final"


def test_the_relays_visitor_connections_are_not_an_interpreted_subclass():
    """The front calls the visitor's Connection several times per request; on an instance of a Python subclass every
    such call is looked up and made through Python (mypyc's glue), so the relay serves plain Connections."""
    source = source_of("portway.relay.server")
    subclasses = [node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef)
                  and any(ast.unparse(base) == "Connection" for base in node.bases)]
    assert subclasses == []
    assert "def __init__(self, on_made:" in source_of("portway.link.connection")  # how it serves them instead
