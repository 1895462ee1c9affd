"""pytest plugin: the runtime's unit tests on an old interpreter (Python 3.6, Ubuntu 18.04's).

The runtime itself (runtime/) runs unchanged: what is under test is that it works there.
The tests and their helpers are written for the development Python (3.9+), so this plugin
lets them load on 3.6 without editing each file:

- modules of tests/ (and builder/, which a few helpers import) are compiled from an AST
  without `from __future__ import annotations` (3.7+), without the annotations of
  functions and with those of variables and fields replaced by a string (what dataclasses
  needs), so `str | None` and `list[str]` are never evaluated; assertions are still
  rewritten by pytest;
- subprocess.run takes capture_output= and text= (3.7), http.server has
  ThreadingHTTPServer (3.7) and random.Random has randbytes (3.9), each as CPython's;
- tests that need the synthetic bundle are deselected: the builder that makes it needs
  Python 3.9 and its third-party modules. The zipapp itself runs on the old Python in the
  loop-device tests, which tasks.py runs with RESIN_MIGRATE_TEST_PYTHON.

What cannot be made to load this way (3.8 syntax such as `:=`, a third-party module the
old virtualenv lacks) stays out of the list of files tasks.py runs under 3.6
(RUNTIME_UNIT_TESTS).

Use: python3.6 -m pytest -p tests.oldpython tests/test_stream.py ...
"""

import ast
import http.server
import importlib.abc
import importlib.machinery
import os
import random
import socketserver
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tests", "builder")


def _head(node):
    """The annotation as a short string: its outermost name (`ClassVar` of `ClassVar[int]`,
    which is all dataclasses looks for in a string annotation)."""
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute):
        return _head(node.value) + "." + node.attr
    if isinstance(node, ast.Name):
        return node.id
    return "object"


class _Stringify(ast.NodeTransformer):
    def _args(self, args):
        for arg in args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if arg is not None:
                arg.annotation = None

    def visit_FunctionDef(self, node):
        self._args(node.args)
        node.returns = None
        self.generic_visit(node)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        node.annotation = ast.copy_location(ast.Str(s=_head(node.annotation)), node.annotation)
        self.generic_visit(node)
        return node

    def visit_ImportFrom(self, node):
        if node.module == "__future__":
            node.names = [alias for alias in node.names if alias.name != "annotations"]
            if not node.names:
                return None
        return node


class _Loader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):
        source = self.get_data(self.path)
        tree = _Stringify().visit(ast.parse(source, self.path))
        ast.fix_missing_locations(tree)
        name = os.path.basename(self.path)
        if name == "conftest.py" or (name.startswith("test_") and name.endswith(".py")):
            from _pytest.assertion.rewrite import rewrite_asserts
            rewrite_asserts(tree, source, self.path)
        return compile(tree, self.path, "exec", dont_inherit=True)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] not in PACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if (spec is None or not spec.origin or not spec.origin.endswith(".py")
                or not os.path.abspath(spec.origin).startswith(ROOT + os.sep)):
            return spec
        spec.loader = _Loader(fullname, spec.origin)
        return spec


_run = subprocess.run


def _subprocess_run(*args, **kwargs):
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if "text" in kwargs:
        kwargs["universal_newlines"] = kwargs.pop("text")
    return _run(*args, **kwargs)


def _randbytes(self, n):
    return self.getrandbits(n * 8).to_bytes(n, "little")


class _ThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # a client that hangs up on purpose (tests/httpserver.py's faults): 3.6's
        # socketserver prints a traceback where later versions stay quiet
        if not isinstance(sys.exc_info()[1], ConnectionError):
            http.server.HTTPServer.handle_error(self, request, client_address)


if sys.version_info < (3, 7):
    sys.meta_path.insert(0, _Finder())
    subprocess.run = _subprocess_run
    http.server.ThreadingHTTPServer = _ThreadingHTTPServer
if not hasattr(random.Random, "randbytes"):
    random.Random.randbytes = _randbytes

NEEDS_BUILDER = "synthetic_bundle"


def pytest_collection_modifyitems(config, items):
    if sys.version_info >= (3, 9):
        return
    deselected = [item for item in items if NEEDS_BUILDER in getattr(item, "fixturenames", ())]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


def pytest_report_header(config):
    return ("old interpreter: runtime/ as it is; tests loaded by tests/oldpython.py; tests "
            "that need a bundle ({}) deselected".format(NEEDS_BUILDER))
