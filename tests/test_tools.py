"""Every command the runtime runs, and every option it gives one, is in docs/tools.md.

The runtime's sources are read with `ast`: every call of a function that runs a command
(`run`, `Popen` and the helpers that pass their argv on to one, found by following them),
its argv (list literals, `+`, `list(...)`, local variables built with `=` and `+=`), the
program (a string, or a name bound to one: a constant, `which(CONSTANT)`, an import) and
the options (string items starting with "-"; `--long=value` counts as `--long`).
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from runtime import preflight, stream
from runtime.system import compare_versions

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "runtime"
TABLE = ROOT / "docs" / "tools.md"

# what runs a program, and which positional argument is its argv
BASE_RUNNERS = {"run": {0}, "Popen": {0}, "call": {0}, "check_call": {0}, "check_output": {0}}
# of those, the ones that count only as subprocess's (not a local function named `call`)
SUBPROCESS = {"Popen", "call", "check_call", "check_output"}
# calls that run a program the scanner cannot follow: none may appear in the runtime
FORBIDDEN = {"system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execlp",
             "spawnv", "spawnve", "spawnvp", "spawnl", "spawnlp", "getoutput",
             "getstatusoutput"}
# commands whose program is not a tool of a package: (file, function) -> why
NOT_A_TOOL = {("runtime/backup.py", "_run_script"): "the user's --backup-script"}
# the oldest versions the runtime supports (REFERENCE.md section 5), by package as the
# table's `oldest` column names it
TARGETS = {"util-linux": "2.20.1", "e2fsprogs": "1.42.9", "GRUB": "2.02~beta2",
           "coreutils": "8.21", "iproute2": "3.12", "zstd": "1.0.0"}


@dataclass
class Invocation:
    path: str
    line: int
    function: str
    command: str | None
    options: list[str] = field(default_factory=list)


def _params(function: ast.FunctionDef, in_class: bool) -> list[str]:
    names = [arg.arg for arg in function.args.args]
    return names[1:] if in_class and names else names


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


class _Module:
    def __init__(self, name: str, path: str, tree: ast.Module) -> None:
        self.name, self.path, self.tree = name, path, tree
        self.constants: dict[str, str] = {}
        self.imports: dict[str, tuple[str, str]] = {}
        self.absolute: dict[str, str] = {}       # from subprocess import Popen -> subprocess
        self.which: dict[str, ast.expr] = {}      # name = which(EXPR), anywhere in the module
        self.functions: list[tuple[ast.FunctionDef, bool]] = []
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                    isinstance(node.targets[0], ast.Name) and \
                    isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                self.constants[node.targets[0].id] = node.value.value
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = name.split(".")
                package = parts[:len(parts) - node.level]
                target = ".".join(package + ([node.module] if node.module else []))
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (target, alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    self.absolute[alias.asname or alias.name] = node.module
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                    isinstance(node.targets[0], ast.Name) and \
                    isinstance(node.value, ast.Call) and _callee(node.value) == "which" and \
                    node.value.args:
                self.which[node.targets[0].id] = node.value.args[0]
            elif isinstance(node, ast.ClassDef):
                self.functions += [(item, True) for item in node.body
                                   if isinstance(item, ast.FunctionDef)]
        methods = {id(function) for function, _ in self.functions}
        self.functions += [(node, False) for node in ast.walk(tree)
                           if isinstance(node, ast.FunctionDef) and id(node) not in methods]


class Scanner:
    """The commands a set of runtime modules runs: scan() -> invocations, problems."""

    def __init__(self, sources: dict[str, str]) -> None:
        # sources: "runtime/netconfig/carry.py" -> text
        self.modules: dict[str, _Module] = {}
        for path, text in sources.items():
            name = ".".join(Path(path).with_suffix("").parts[1:])
            self.modules[name] = _Module(name, path, ast.parse(text, path))
        self.runners = {name: set(positions) for name, positions in BASE_RUNNERS.items()}
        self.invocations: list[Invocation] = []
        self.problems: list[str] = []

    def scan(self) -> tuple[list[Invocation], list[str]]:
        self._find_runners()
        for module in self.modules.values():
            for function, in_class in module.functions:
                self._scan_calls(module, function, _params(function, in_class))
            self._scan_calls(module, None, [])
        return self.invocations, self.problems

    @staticmethod
    def _own_calls(node: ast.AST) -> list[ast.Call]:
        """The calls in a function's (or the module's) own code, not in functions or classes
        defined inside it (those are scanned on their own)."""
        found = []
        todo = list(ast.iter_child_nodes(node))
        while todo:
            child = todo.pop()
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                  ast.Lambda)):
                continue
            if isinstance(child, ast.Call):
                found.append(child)
            todo.extend(ast.iter_child_nodes(child))
        return sorted(found, key=lambda call: (call.lineno, call.col_offset))

    def _positions(self, module: _Module, call: ast.Call) -> set[int]:
        """Which arguments of call are a command line (empty: it runs none)."""
        name = _callee(call)
        if name in SUBPROCESS:
            func = call.func
            from_subprocess = isinstance(func, ast.Attribute) and \
                isinstance(func.value, ast.Name) and func.value.id == "subprocess"
            if not from_subprocess and module.absolute.get(name or "") != "subprocess":
                return set()
        return self.runners.get(name or "", set())

    # -- which functions run their argument

    def _find_runners(self) -> None:
        changed = True
        while changed:
            changed = False
            for module in self.modules.values():
                for function, in_class in module.functions:
                    params = _params(function, in_class)
                    for call in self._own_calls(function):
                        for position in self._positions(module, call):
                            if position >= len(call.args):
                                continue
                            passed = self._passthrough(call.args[position], params)
                            if passed is not None:
                                index = params.index(passed)
                                if index not in self.runners.setdefault(function.name, set()):
                                    self.runners[function.name].add(index)
                                    changed = True

    def _passthrough(self, expr: ast.expr, params: list[str]) -> str | None:
        """The parameter an argv expression passes on whole (argv, list(argv), [...] +
        list(argv)), or None."""
        if isinstance(expr, ast.Name) and expr.id in params:
            return expr.id
        if isinstance(expr, ast.Call) and _callee(expr) == "list" and len(expr.args) == 1:
            return self._passthrough(expr.args[0], params)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self._passthrough(expr.right, params) or \
                self._passthrough(expr.left, params)
        return None

    # -- the argv of each call

    def _scan_calls(self, module: _Module, function: ast.FunctionDef | None,
                    params: list[str]) -> None:
        for node in self._own_calls(function if function is not None else module.tree):
            name = _callee(node)
            where = "{}:{}".format(module.path, node.lineno)
            if name in FORBIDDEN and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and \
                    node.func.value.id in ("os", "subprocess"):
                self.problems.append("{} runs a command with {}.{}(), which this scan "
                                     "cannot read: use run()".format(
                                         where, node.func.value.id, name))
                continue
            for position in sorted(self._positions(module, node)):
                if position < len(node.args):
                    self._invocation(module, function, params, node.args[position],
                                     where, node.lineno)

    def _invocation(self, module: _Module, function: ast.FunctionDef | None,
                    params: list[str], expr: ast.expr, where: str, line: int) -> None:
        if self._passthrough(expr, params) is not None and not self._literal_head(expr):
            return      # a helper passing its caller's argv on: the callers are scanned
        items = self._argv(module, function, params, expr)
        if items is None:
            self.problems.append("{}: cannot read the command line {}".format(
                where, ast.unparse(expr)))
            return
        name = function.name if function is not None else "<module>"
        command = items[0] if items and isinstance(items[0], str) else None
        if command is not None:
            command = command.rsplit("/", 1)[-1]
        options = []
        for item in items[1:]:
            if isinstance(item, str) and item.startswith("-") and len(item) > 1:
                options.append(item.split("=", 1)[0] if item.startswith("--") else item)
        self.invocations.append(Invocation(module.path, line, name, command, options))

    def _literal_head(self, expr: ast.expr) -> bool:
        return isinstance(expr, ast.BinOp) and isinstance(expr.left, (ast.List, ast.Tuple))

    def _argv(self, module: _Module, function: ast.FunctionDef | None, params: list[str],
              expr: ast.expr, depth: int = 0) -> list[str | None] | None:
        """The items of an argv expression: strings where known, None where not."""
        if depth > 5:
            return None
        if isinstance(expr, (ast.List, ast.Tuple)):
            return [self._string(module, function, item) for item in expr.elts]
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            left = self._argv(module, function, params, expr.left, depth + 1)
            right = self._argv(module, function, params, expr.right, depth + 1)
            if left is None:
                return None
            return left + (right if right is not None else [None])
        if isinstance(expr, ast.Call) and _callee(expr) == "list" and len(expr.args) == 1:
            return self._argv(module, function, params, expr.args[0], depth + 1)
        if isinstance(expr, ast.Name) and function is not None and expr.id not in params:
            items: list[str | None] = []
            found = False
            for node in ast.walk(function):
                value = None
                if isinstance(node, ast.Assign) and any(
                        isinstance(target, ast.Name) and target.id == expr.id
                        for target in node.targets):
                    value, found = node.value, True
                    items = []
                elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) \
                        and node.target.id == expr.id and isinstance(node.op, ast.Add):
                    value = node.value
                if value is not None:
                    more = self._argv(module, function, params, value, depth + 1)
                    if more is None:
                        return None
                    items += more
            return items if found else None
        return None

    def _string(self, module: _Module, function: ast.FunctionDef | None,
                expr: ast.expr, depth: int = 0) -> str | None:
        """The string an argv item certainly is, or None (a path, a number, a label...)."""
        if depth > 5:
            return None
        if isinstance(expr, ast.Constant):
            return expr.value if isinstance(expr.value, str) else None
        if not isinstance(expr, ast.Name):
            return None
        name = expr.id
        if function is not None:
            for node in ast.walk(function):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                        isinstance(node.targets[0], ast.Name) and node.targets[0].id == name:
                    if isinstance(node.value, ast.Constant) and \
                            isinstance(node.value.value, str) and node.value.value:
                        return node.value.value
                    if isinstance(node.value, ast.Call) and _callee(node.value) == "which" \
                            and node.value.args:
                        return self._string(module, function, node.value.args[0], depth + 1)
        if name in module.constants:
            return module.constants[name]
        if name in module.imports:
            target, original = module.imports[name]
            other = self.modules.get(target)
            if other is not None and original in other.constants:
                return other.constants[original]
        if name in module.which:     # a parameter holding which(CONSTANT), as its caller set it
            return self._string(module, None, module.which[name], depth + 1)
        return None


def runtime_sources() -> dict[str, str]:
    paths = sorted(RUNTIME.glob("*.py")) + sorted((RUNTIME / "netconfig").glob("*.py"))
    return {str(path.relative_to(ROOT)): path.read_text(encoding="utf-8") for path in paths}


@dataclass
class Row:
    command: str
    options: list[str]
    oldest: str
    source: str
    without: str
    required: str


def table_rows(text: str) -> list[Row]:
    """The rows of the table whose header starts `| command | options |`."""
    rows: list[Row] = []
    inside = False
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            inside = False
            continue
        if cells[:2] == ["command", "options"]:
            inside = True
            continue
        if not inside or set(line) <= set("|- "):
            continue
        assert len(cells) == 6, line
        command = re.fullmatch(r"`([^`]+)`", cells[0])
        assert command, line
        options = re.findall(r"`([^`]+)`", cells[1]) if cells[1] != "—" else []
        rows.append(Row(command.group(1), options, cells[2], cells[3], cells[4],
                        cells[5].strip("`")))
    return rows


def documented() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for row in table_rows(TABLE.read_text(encoding="utf-8")):
        found.setdefault(row.command, set()).update(row.options)
    return found


def disagreements(invocations: list[Invocation], table: dict[str, set[str]],
                  both_ways: bool = True) -> list[str]:
    """What the code runs that the table does not list (and, both_ways, the reverse)."""
    problems = []
    used: dict[str, set[str]] = {}
    for call in invocations:
        if call.command is None:
            if (call.path, call.function) not in NOT_A_TOOL:
                problems.append("{}:{} ({}) runs a program this scan cannot name".format(
                    call.path, call.line, call.function))
            continue
        used.setdefault(call.command, set()).update(call.options)
        if call.command not in table:
            problems.append("{}:{} runs `{}`, which docs/tools.md does not list".format(
                call.path, call.line, call.command))
            continue
        for option in call.options:
            if option not in table[call.command]:
                problems.append("{}:{} runs `{} {}`: docs/tools.md does not list `{}` for "
                                "`{}`".format(call.path, call.line, call.command, option,
                                              option, call.command))
    if both_ways:
        for command, options in sorted(table.items()):
            if command not in used:
                problems.append("docs/tools.md lists `{}`, which the runtime no longer "
                                "runs".format(command))
                continue
            for option in sorted(options - used[command]):
                problems.append("docs/tools.md lists `{} {}`, which the runtime no longer "
                                "gives".format(command, option))
    return problems


def scan_runtime() -> tuple[list[Invocation], list[str]]:
    return Scanner(runtime_sources()).scan()


def test_every_command_and_option_is_in_the_table() -> None:
    invocations, problems = scan_runtime()
    assert not problems, "\n".join(problems)
    assert not disagreements(invocations, documented()), \
        "\n".join(disagreements(invocations, documented()))


def test_the_scan_finds_what_the_runtime_is_known_to_run() -> None:
    """The scan follows the helpers: argv built in steps, the chroot wrapper, the BLKPG
    fallback, the ip runner, the zstd pipe and its constant."""
    invocations, _ = scan_runtime()
    seen = {(call.command, tuple(call.options)) for call in invocations}
    for expected in [("mkswap", ("-L", "-U")), ("grub-probe", ("--target",)),
                     ("grub-reboot", ()), ("chroot", ()), ("ip", ("-j",)), ("ip", ("-o",)),
                     ("zstd", ("-dc", "-q")), ("zstd", ("-V",)),
                     ("partx", ("--add", "--nr")), ("udevadm", ("--timeout",)),
                     ("grub-mkimage", ("-O", "-d", "-c", "-p", "-o"))]:
        assert expected in seen, expected
    assert stream.ZSTD == "zstd"
    assert [(call.path, call.function) for call in invocations if call.command is None] == \
        list(NOT_A_TOOL)


def test_table_versions_are_the_oldest_targets_or_have_a_way_round() -> None:
    rows = table_rows(TABLE.read_text(encoding="utf-8"))
    assert rows
    problems = []
    for row in rows:
        words = row.oldest.replace("≤", "").split()
        assert row.source and row.source != "—", row
        if len(words) < 2 or words[0] not in TARGETS:
            continue
        package, version = words[0], words[1]
        if compare_versions(version, TARGETS[package]) > 0 and row.without in ("", "—"):
            problems.append("`{}` {}: {} {} is newer than the oldest target {} {}, and the "
                            "row names no path without it".format(
                                row.command, " ".join(row.options), package, version,
                                package, TARGETS[package]))
    assert not problems, "\n".join(problems)


def test_preflight_requires_what_the_table_says() -> None:
    rows = table_rows(TABLE.read_text(encoding="utf-8"))
    required: dict[str, set[str]] = {}
    for row in rows:
        required.setdefault(row.required, set()).add(row.command)
    assert {name for name, _ in preflight.TOOLS} == required.get("TOOLS", set())
    assert {name for name, _ in preflight.GRUB_TOOLS} == required.get("GRUB_TOOLS", set())
    assert required.get("zstd streams") == {stream.ZSTD}
    assert set(required) <= {"TOOLS", "GRUB_TOOLS", "zstd streams", "optional", "other"}, \
        sorted(required)


def test_the_scanner_catches_a_new_command_or_option() -> None:
    """Its self-test: a snippet with an sfdisk --json (util-linux 2.27) anywhere, an option
    added to a documented command, a program in a variable, an argv built in steps and
    passed through a helper, and an os.system."""
    snippet = textwrap.dedent('''
        import os
        from .run import run, which

        SFDISK = "sfdisk"


        def helper(note, argv):
            run(argv, check=False)


        def table(disk):
            data = run(["sfdisk", "--json", disk]).stdout
            run([SFDISK, "--dump", disk])
            argv = ["blkid"]
            argv += ["-p", "--output=export"]
            helper("probe", argv + [disk])
            tool = which(SFDISK)
            run([tool, "-V"])
            run(["mount", "--make-private", disk])
            os.system("sfdisk -l " + disk)
            return data
        ''')
    invocations, problems = Scanner({"runtime/snippet.py": snippet,
                                     "runtime/run.py": (RUNTIME / "run.py").read_text()}).scan()
    assert [(call.command, call.options) for call in invocations] == [
        ("sfdisk", ["--json"]), ("sfdisk", ["--dump"]), ("blkid", ["-p", "--output"]),
        ("sfdisk", ["-V"]), ("mount", ["--make-private"])]
    assert problems == ["runtime/snippet.py:21 runs a command with os.system(), which this "
                        "scan cannot read: use run()"]
    found = disagreements(invocations, documented(), both_ways=False)
    assert found == [
        "runtime/snippet.py:13 runs `sfdisk`, which docs/tools.md does not list",
        "runtime/snippet.py:14 runs `sfdisk`, which docs/tools.md does not list",
        "runtime/snippet.py:17 runs `blkid --output`: docs/tools.md does not list `--output` "
        "for `blkid`",
        "runtime/snippet.py:19 runs `sfdisk`, which docs/tools.md does not list",
        "runtime/snippet.py:20 runs `mount --make-private`: docs/tools.md does not list "
        "`--make-private` for `mount`"]
    # an unnamed program is named as such
    unnamed = Scanner({"runtime/x.py": "def go(path):\n    run([path, '-x'])\n"}).scan()[0]
    assert disagreements(unnamed, {}, both_ways=False) == [
        "runtime/x.py:2 (go) runs a program this scan cannot name"]


def test_table_parser_reads_each_cell() -> None:
    [row] = table_rows("| command | options | oldest | read from | without it | required by |\n"
                       "|---|---|---|---|---|---|\n"
                       "| `ip` | `-j`, `-o` | iproute2 4.14 | ip/ip.c | text | optional |\n\n"
                       "| `not` | `-a` | table | two | x | y |\n")
    assert (row.command, row.options, row.oldest, row.required) == \
        ("ip", ["-j", "-o"], "iproute2 4.14", "optional")
