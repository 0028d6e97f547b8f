"""Build hook: the sans-I/O hot path compiled with mypyc when it can be, the same modules in pure Python when not.

Every module listed in COMPILED is also shipped as source, and a module whose extension is missing imports from
its .py: a machine without a C compiler (or where mypyc refuses the code) gets a working pure-Python install,
only slower per request. PORTWAY_PURE_PYTHON=1 at build time skips the compiled build on purpose.

Compiled, these modules' annotations are checked at run time, their classes refuse subclasses from Python unless
marked (mypyc_attr(allow_interpreted_subclasses=True)), and their instances must not be weakly referenced (mypyc
does not clear weak references to them when they are freed): the tests run both builds.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from portway.build_info import HOT_PATH  # noqa: E402  (one list of the compiled modules, read at run time too)

COMPILED = ["src/" + name.replace(".", "/") + ".py" for name in HOT_PATH]
BUILT_FROM = "src/portway/hot_path_sources.json"


def compiled_extensions() -> list:
    if os.environ.get("PORTWAY_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("portway: mypyc is not available, installing the pure-Python modules", file=sys.stderr)
        return []
    try:
        # the build environment has mypy but not the runtime dependencies: their types are Any to it, and the
        # modules left as Python are read for their types but not held to mypy's checks
        options = ["--ignore-missing-imports", "--follow-imports=silent"]
        extensions = mypycify(options + COMPILED, opt_level="3", group_name="portway", verbose=False)
    except BaseException as error:  # mypyc exits on code it refuses: the pure-Python modules still work
        print(f"portway: mypyc could not compile the hot path ({error!r}), installing pure Python", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: setuptools skips it and the .py module is used
    # what the extensions were built from, so the test suite can refuse extensions older than their sources
    digests = {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in COMPILED}
    Path(BUILT_FROM).write_text(json.dumps(digests, indent=1) + "\n")
    return extensions


setup(ext_modules=compiled_extensions())
