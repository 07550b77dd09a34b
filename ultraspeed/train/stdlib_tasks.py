"""HumanEval-style code tasks cut from the Python standard library, to train a drafter on more code.

HumanEval has 164 tasks and only 120 of them are ours to train on (the rest are held out for `bench
acceptance`), too few for the target's coding style to be covered. Every Python installation carries hundreds
of documented functions in pure-Python modules: a function's signature and docstring, with the body removed,
is a HumanEval-format task ("complete this function"), and the target's own answer to it is self-distillation
data like any other. Only top-level, undecorated, public functions with a short docstring and a real body are
used. The order is fixed (modules round-robin, functions in source order), so a larger count extends a smaller
one; it depends on the Python version installed, like the rest of the cached data depends on the packages.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from itertools import zip_longest

# Pure-Python modules, algorithmic ones first: their functions read most like HumanEval tasks.
MODULES = (
    "statistics", "heapq", "bisect", "textwrap", "difflib", "shlex", "calendar", "fnmatch", "base64", "quopri",
    "html", "ipaddress", "functools", "operator", "copy", "string", "reprlib", "pprint", "urllib.parse",
    "email.utils", "glob", "json.encoder", "tokenize", "typing", "inspect", "shutil", "tempfile", "locale",
    "mimetypes", "platform", "sysconfig", "tarfile", "gzip", "ftplib", "http.cookiejar", "urllib.request",
    "xml.etree.ElementTree", "plistlib", "pickletools", "dis", "ast", "linecache", "traceback", "warnings",
    "dataclasses", "enum", "secrets", "uuid", "filecmp", "threading", "subprocess", "socket", "logging",
    "unittest.case", "doctest", "timeit", "pkgutil", "importlib.metadata", "re", "wsgiref.util",
)
MAX_DOC_LINES = 20


def task_prompt(fn: ast.FunctionDef) -> str | None:
    """`def name(args) -> ret:` and its docstring, or None when the function is not a usable task."""
    doc = ast.get_docstring(fn, clean=True)
    if (fn.name.startswith("_") or fn.decorator_list or not doc or len(doc.splitlines()) > MAX_DOC_LINES
            or len(fn.body) < 2):  # a docstring and at least one statement to write
        return None
    returns = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    body = "\n".join(("    " + line).rstrip() for line in doc.splitlines())
    return f'def {fn.name}({ast.unparse(fn.args)}){returns}:\n    """{body.lstrip()}\n    """\n'


def module_tasks(source: str) -> list[str]:
    return [p for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
            and (p := task_prompt(node)) is not None]


@lru_cache(maxsize=1)
def stdlib_tasks() -> tuple[str, ...]:
    """Every task of MODULES, taking one function from each module in turn (a function one module imports
    from another appears once)."""
    per_module = []
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, encoding="utf-8") as f:
                per_module.append(module_tasks(f.read()))
    in_turn = (t for group in zip_longest(*per_module) for t in group if t is not None)
    return tuple(dict.fromkeys(in_turn))
