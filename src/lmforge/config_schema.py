"""Typed schema of a composed config, read from the code the config builds, so the two cannot drift apart.

Every node with a `_target_` is checked against the signature of the class or function it names: a key the
target does not take is refused with a "did you mean" (difflib), and a plain YAML value (int, float, bool,
str, null, list, dict) that its annotation rules out (`int`, `float`, `bool`, `str`, `Optional[...]`,
`Literal[...]`, `Union`, `X | Y`, list/tuple/dict types) is refused naming the expected type. Ints pass
for floats; interpolations (`${...}`), `???`, nested `_target_` nodes and annotations this module cannot
resolve (classes, callables, `Any`) are not judged. A target that takes `**kwargs` is followed through
`super().__init__(**kwargs)` to its base class, or to a known receiver (`KWARGS_SINKS`: DDPStrategy's go to
`DistributedDataParallel`); when the kwargs go anywhere else (W&B's `wandb.init`) unknown keys are not checked for
that node. Nodes without a target have a small
dataclass here (top level, `paths`, `strategy` by name) or use the code's own schema (`model`: the family
dataclass, `data.clean`: `CleanConfig`, `peft`: the method's keys).

Signatures are read from the targets' *source* with `ast`, not by importing them: importing Lightning
alone takes 5-10 s on a small machine, and a typo must fail in about a second, before any heavy import
(`tests/unit/test_config_schema.py` checks the result against `inspect.signature` of the real classes).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from lmforge.errors import ConfigError

HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})
# Keys lmforge rewrites before the target sees them, and checks itself: `trainer.precision=auto` becomes a
# concrete precision in run.resolve_trainer_precision (preflight.check_machine names the valid spellings).
REWRITTEN = frozenset({"trainer.precision"})
MAX_DEPTH = 12  # import / alias / base-class hops followed before giving up (unknown, not an error)


# --- schemas of the nodes that have no `_target_` ---------------------------------------------------------

@dataclass
class TrainConfig:
    """Top-level keys of conf/train.yaml (each group is checked on its own). An unknown top-level key is an
    error only when it is close to one of these (a typo): experiments may add helper nodes (`ladder`)."""

    task_name: str = "train"
    tags: list[str] | None = None
    seed: int | None = None
    ckpt_path: str | None = None
    init_from: str | None = None
    validate_full_at_end: bool = True
    optimized_metric: str | None = None
    sweep_bad_score: float = 1.0e4
    matmul_precision: Literal["highest", "high", "medium"] = "high"
    cpu_kernels: Literal["lmforge", "torch"] = "lmforge"  # kernels/cpu_kernels.py
    paths: Any = None
    data: Any = None
    tokenizer: Any = None
    model: Any = None
    objective: Any = None
    stage: Any = None
    peft: Any = None
    optimizer: Any = None
    scheduler: Any = None
    strategy: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    hydra: Any = None


@dataclass
class PathsConfig:
    """conf/paths: where things live (usually interpolations, which are not judged)."""

    root_dir: str = "."
    log_dir: str = "logs"
    cache_dir: str = ".cache/lmforge"
    output_dir: str = "."


@dataclass
class StrategyByName:
    """conf/strategy without a `_target_`: a Lightning strategy name (auto, ddp, fsdp, ...)."""

    name: str = "auto"


# Nodes without `_target_`: (schema target, strict). Lenient: unknown keys are errors only when close to a known one.
UNTARGETED: dict[str, tuple[str, bool]] = {
    "": (f"{__name__}.TrainConfig", False),
    "paths": (f"{__name__}.PathsConfig", False),
    "strategy": (f"{__name__}.StrategyByName", False),
    "data.clean": ("lmforge.data.clean.CleanConfig", True),
}


# --- reading source files without importing them ---------------------------------------------------------

@cache
def module_file(modname: str) -> Path | None | Literal[False]:
    """The .py file of a module, found without importing it or its packages. None: not found (or the top
    package isn't installed); False: it exists but has no Python source (a compiled extension)."""
    parts = modname.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: finders only, nothing is executed
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        if spec.origin and spec.origin.endswith(".py"):
            return Path(spec.origin)
        return False if spec.origin and spec.origin not in ("namespace", "built-in", "frozen") else None
    locations = [Path(p) for p in (spec.submodule_search_locations or [])]
    for i, part in enumerate(parts[1:], start=1):
        last = i == len(parts) - 1
        found: Path | None | Literal[False] = None
        next_locations: list[Path] = []
        for loc in locations:
            if (loc / part / "__init__.py").is_file():
                found, next_locations = loc / part / "__init__.py", [loc / part]
                break
            if (loc / f"{part}.py").is_file():
                found = loc / f"{part}.py"
                break
            if (loc / part).is_dir():  # namespace package
                next_locations.append(loc / part)
                found = found or None
            elif any(loc.glob(f"{part}.*.so")) or any(loc.glob(f"{part}.*.pyd")):
                found = False
        if last:
            return found
        if found is False or (found is not None and not next_locations):
            return None if found is not False else False  # a module, not a package: no submodules
        locations = next_locations
        if not locations:
            return None
    return None


@cache
def module_tree(modname: str) -> ast.Module | None:
    path = module_file(modname)
    if not path:
        return None
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class Binding:
    kind: str  # def (class / function) | import (name from another module) | expr (assignment) | module
    module: str
    node: Any = None  # ClassDef / FunctionDef / value expression
    name: str = ""  # for imports: the name in `module`


@dataclass(frozen=True)
class ModuleNames:
    bindings: dict[str, Binding]
    star_imports: tuple[str, ...]
    dynamic: bool  # a module-level __getattr__: names can't be listed


def _package(modname: str) -> str:
    path = module_file(modname)
    return modname if path and path.name == "__init__.py" else modname.rpartition(".")[0]


def _absolute(modname: str, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = _package(modname).split(".")
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


@cache
def module_names(modname: str) -> ModuleNames | None:
    """Top-level names a module binds (in `if` / `try` blocks too; the first binding wins)."""
    tree = module_tree(modname)
    if tree is None:
        return None
    bindings: dict[str, Binding] = {}
    stars: list[str] = []
    dynamic = False

    def visit(body: list[ast.stmt]) -> None:
        nonlocal dynamic
        for stmt in body:
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                bindings.setdefault(stmt.name, Binding("def", modname, stmt))
                dynamic = dynamic or stmt.name == "__getattr__"
            elif isinstance(stmt, ast.ImportFrom):
                source = _absolute(modname, stmt.level, stmt.module)
                for alias in stmt.names:
                    if alias.name == "*":
                        stars.append(source)
                    else:
                        bindings.setdefault(alias.asname or alias.name, Binding("import", source, name=alias.name))
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    bindings.setdefault(alias.asname or alias.name.split(".")[0], Binding("module", alias.name if alias.asname else alias.name.split(".")[0]))
            elif isinstance(stmt, ast.Assign):
                for tgt in stmt.targets:
                    if isinstance(tgt, ast.Name):
                        bindings.setdefault(tgt.id, Binding("expr", modname, stmt.value))
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                bindings.setdefault(stmt.target.id, Binding("expr", modname, stmt.value))
            elif isinstance(stmt, ast.If):
                visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                visit(stmt.body)
                for handler in stmt.handlers:
                    visit(handler.body)
                visit(stmt.orelse)
                visit(stmt.finalbody)
            elif isinstance(stmt, ast.With):
                visit(stmt.body)

    visit(tree.body)
    return ModuleNames(bindings, tuple(stars), dynamic)


NOT_FOUND = Binding("missing", "")


def resolve(modname: str, name: str, depth: int = 0) -> Binding | None:
    """What `modname.name` is, following `from x import y` and `y = x` aliases. None: can't tell; NOT_FOUND:
    the module was read and does not define the name."""
    if depth > MAX_DEPTH:
        return None
    names = module_names(modname)
    if names is None:
        return None
    b = names.bindings.get(name)
    if b is None:
        for star in names.star_imports:
            found = resolve(star, name, depth + 1)
            if found is not None and found is not NOT_FOUND:
                return found
        if names.dynamic or names.star_imports:
            return None
        return NOT_FOUND if module_file(f"{modname}.{name}") is None else Binding("module", f"{modname}.{name}")
    if b.kind == "import":
        if module_file(f"{b.module}.{b.name}"):  # `from pkg import submodule`
            return Binding("module", f"{b.module}.{b.name}")
        found = resolve(b.module, b.name, depth + 1)
        return None if found is NOT_FOUND else found
    if b.kind == "expr" and isinstance(b.node, (ast.Name, ast.Attribute)):  # `Alias = Other`
        return resolve_expr(modname, b.node, depth + 1) or b
    return b


def resolve_expr(modname: str, expr: ast.expr, depth: int = 0) -> Binding | None:
    """A Name or dotted Attribute in `modname`'s namespace (e.g. `nn.Module`, `pl.LightningModule`)."""
    if isinstance(expr, ast.Name):
        found = resolve(modname, expr.id, depth)
        return None if found is NOT_FOUND else found
    if isinstance(expr, ast.Attribute):
        owner = resolve_expr(modname, expr.value, depth + 1)
        if owner is not None and owner.kind == "module":
            found = resolve(owner.module, expr.attr, depth + 1)
            return None if found is NOT_FOUND else found
    return None


# --- signatures -------------------------------------------------------------------------------------------

NO_DEFAULT = object()


@dataclass
class Param:
    name: str
    annotation: ast.expr | None
    module: str  # where the annotation's names live
    default: Any = NO_DEFAULT  # an ast.expr, or NO_DEFAULT


@dataclass
class Signature:
    owner: str  # the target, for messages
    params: dict[str, Param]
    open_kwargs: bool  # takes **kwargs that go somewhere this module can't follow: unknown keys not judged


def _function_params(fn: ast.FunctionDef | ast.AsyncFunctionDef, module: str, method: bool) -> tuple[dict[str, Param], str | None]:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults: list[Any] = [NO_DEFAULT] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params: dict[str, Param] = {}
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        if method and i == 0:
            continue
        if arg in a.posonlyargs:
            continue  # cannot be passed by keyword
        params[arg.arg] = Param(arg.arg, arg.annotation, module, default)
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        params[arg.arg] = Param(arg.arg, arg.annotation, module, NO_DEFAULT if default is None else default)
    return params, (a.kwarg.arg if a.kwarg else None)


def _is_dataclass(cls: ast.ClassDef) -> bool:
    for dec in cls.decorator_list:
        node = dec.func if isinstance(dec, ast.Call) else dec
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
        if name == "dataclass":
            return True
    return False


def _dataclass_fields(cls: ast.ClassDef, module: str) -> dict[str, Param]:
    out: dict[str, Param] = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            ann = ast.unparse(stmt.annotation)
            if "ClassVar" in ann or "InitVar" in ann:
                continue
            value = stmt.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) == "field":
                if any(k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False for k in value.keywords):
                    continue
                value = next((k.value for k in value.keywords if k.arg == "default"), NO_DEFAULT)
            out[stmt.target.id] = Param(stmt.target.id, stmt.annotation, module, NO_DEFAULT if value is None else value)
    return out


def _forwards_kwargs(fn: ast.FunctionDef, kwarg: str, base: ast.expr | None) -> bool:
    """`super().__init__(..., **kwargs)` or `Base.__init__(self, ..., **kwargs)` in the body."""
    for node in ast.walk(fn):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"):
            continue
        owner = node.func.value
        is_super = isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "super"
        is_base = base is not None and ast.dump(owner) == ast.dump(base)
        if (is_super or is_base) and any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == kwarg for k in node.keywords):
            return True
    return False


TRIVIAL_BASES = {"object", "ABC", "Generic", "Protocol"}
# Classes whose `**kwargs` go to another callable rather than to their base class: their unknown keys are checked
# against that callable's keyword parameters, less the ones the class passes itself.
KWARGS_SINKS: dict[str, tuple[str, frozenset[str]]] = {
    "lightning.pytorch.strategies.ddp.DDPStrategy": ("torch.nn.parallel.distributed.DistributedDataParallel", frozenset({"module", "device_ids"})),
}


def _is_pure_mixin(cls: ast.ClassDef) -> bool:
    """A class that only adds methods: no __init__, not a dataclass, and no bases but trivial ones."""
    has_init = any(isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == "__init__" for s in cls.body)
    trivial = all(ast.unparse(b).rsplit(".", 1)[-1] in TRIVIAL_BASES for b in cls.bases)
    return not has_init and not _is_dataclass(cls) and trivial


def class_signature(module: str, cls: ast.ClassDef, owner: str, depth: int = 0) -> Signature | None:
    """Keyword parameters of `cls(...)`. None: can't tell (a base outside Python source, odd MRO)."""
    if depth > MAX_DEPTH:
        return None
    bases = [b for b in cls.bases if not (isinstance(b, ast.Subscript) or ast.unparse(b).rsplit(".", 1)[-1] in TRIVIAL_BASES)]

    def base_signature() -> Signature | None:
        rest = list(bases)
        while rest:
            found = resolve_expr(module, rest[0], depth + 1)
            if found is None or found.kind != "def" or not isinstance(found.node, ast.ClassDef):
                return None
            if len(rest) > 1 and _is_pure_mixin(found.node):
                rest = rest[1:]  # methods only, no __init__ anywhere up its line: the next base's __init__ is the one
                continue
            if len(rest) > 1 and not any(isinstance(s, ast.FunctionDef) and s.name == "__init__" for s in found.node.body):
                return None  # the next __init__ in the MRO may be another base's: not "simple"
            return class_signature(found.module, found.node, owner, depth + 1)
        return Signature(owner, {}, False)

    if _is_dataclass(cls):
        inherited = base_signature() if bases else Signature(owner, {}, False)
        fields = _dataclass_fields(cls, module)
        if inherited is None:
            return Signature(owner, fields, True)
        return Signature(owner, {**inherited.params, **fields}, inherited.open_kwargs)
    init = next((s for s in cls.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == "__init__"), None)
    if init is None:
        return base_signature()
    params, kwarg = _function_params(init, module, method=True)
    if kwarg is None:
        return Signature(owner, params, False)
    if _forwards_kwargs(init, kwarg, bases[0] if bases else None):
        inherited = base_signature()
        if inherited is not None:
            return Signature(owner, {**inherited.params, **params}, inherited.open_kwargs)
    sink = KWARGS_SINKS.get(f"{module}.{cls.name}")
    if sink is not None:
        receiver = target_signature(sink[0])
        if isinstance(receiver, Signature):
            passed_on = {k: v for k, v in receiver.params.items() if k not in sink[1]}
            return Signature(owner, {**passed_on, **params}, receiver.open_kwargs)
    return Signature(owner, params, True)


def target_signature(target: str) -> Signature | None | str:
    """The signature of a `_target_`, None when it can't be read, or a message when the target doesn't exist."""
    module, _, name = target.rpartition(".")
    if not module:
        return None
    path = module_file(module)
    if path is None:
        return _missing_module(module)
    if path is False:
        return None
    found = resolve(module, name)
    if found is NOT_FOUND:
        names = module_names(module)
        known = sorted(n for n in (names.bindings if names else {}) if not n.startswith("_"))
        close = difflib.get_close_matches(name, known, n=1)
        return f"{module} has no {name!r}" + (f"; did you mean `{module}.{close[0]}`?" if close else "")
    if found is None or found.kind != "def":
        return None
    if isinstance(found.node, ast.ClassDef):
        return class_signature(found.module, found.node, target)
    params, kwarg = _function_params(found.node, found.module, method=False)
    return Signature(target, params, kwarg is not None)


def _missing_module(module: str) -> str | None:
    """A message for a `_target_` module that isn't there, when its package is (else None: an optional
    dependency that isn't installed is instantiate's business)."""
    parent, _, leaf = module.rpartition(".")
    pkg = module_file(parent) if parent else None
    if not pkg or pkg.name != "__init__.py" or resolve(parent, leaf) is not NOT_FOUND:
        return None  # `module.Class.factory`, a name the package binds, or a package this module can't list
    siblings = [p.stem if p.suffix == ".py" else p.name for p in pkg.parent.iterdir()]
    close = difflib.get_close_matches(leaf, [s for s in siblings if not s.startswith("_")], n=1)
    return f"no module {module}" + (f"; did you mean `{parent}.{close[0]}`?" if close else "")


# --- annotations → a small type language ------------------------------------------------------------------

# ("any",) ("unknown",) ("none",) ("scalar", int|float|bool|str) ("literal", values) ("union", members)
# ("list", element | None, str_is_ok) ("tuple", elements) ("dict",)
ANY, UNKNOWN, NONE = ("any",), ("unknown",), ("none",)
SCALARS = {"int": int, "float": float, "bool": bool, "str": str}
LISTS = {"list": False, "List": False, "tuple": False, "Tuple": False, "set": False, "Set": False, "frozenset": False,
         "FrozenSet": False, "Sequence": True, "MutableSequence": False, "Iterable": True, "Collection": True}
DICTS = {"dict", "Dict", "Mapping", "MutableMapping", "DictConfig", "OrderedDict"}


def ann_type(expr: ast.expr | None, module: str, depth: int = 0) -> tuple:
    if expr is None or depth > MAX_DEPTH:
        return UNKNOWN
    if isinstance(expr, ast.Constant):
        if expr.value is None:
            return NONE
        if isinstance(expr.value, str):  # a forward reference
            try:
                return ann_type(ast.parse(expr.value, mode="eval").body, module, depth + 1)
            except SyntaxError:
                return UNKNOWN
        return UNKNOWN
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):
        return ("union", (ann_type(expr.left, module, depth + 1), ann_type(expr.right, module, depth + 1)))
    name = expr.id if isinstance(expr, ast.Name) else expr.attr if isinstance(expr, ast.Attribute) else None
    if name is not None:
        if name in SCALARS:
            return ("scalar", SCALARS[name])
        if name in ("Any", "object"):
            return ANY
        if name in LISTS:
            return ("list", None, LISTS[name])
        if name in DICTS:
            return ("dict",)
        if name == "None" or name == "NoneType":
            return NONE
        if isinstance(expr, ast.Name):  # a module-level alias: `_PATH = Union[str, Path]`
            found = resolve(module, name, depth + 1)
            if found is not None and found.kind == "expr":
                return ann_type(found.node, found.module, depth + 1)
        return UNKNOWN
    if isinstance(expr, ast.Subscript):
        head = expr.value.id if isinstance(expr.value, ast.Name) else expr.value.attr if isinstance(expr.value, ast.Attribute) else ""
        args = list(expr.slice.elts) if isinstance(expr.slice, ast.Tuple) else [expr.slice]
        if head == "Optional":
            return ("union", (ann_type(args[0], module, depth + 1), NONE))
        if head == "Union":
            return ("union", tuple(ann_type(a, module, depth + 1) for a in args))
        if head == "Literal":
            values = tuple(a.value for a in args if isinstance(a, ast.Constant))
            return ("literal", values) if len(values) == len(args) else UNKNOWN
        if head == "Annotated":
            return ann_type(args[0], module, depth + 1)
        if head in ("tuple", "Tuple"):
            if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
                return ("list", ann_type(args[0], module, depth + 1), False)
            return ("tuple", tuple(ann_type(a, module, depth + 1) for a in args))
        if head in LISTS:
            return ("list", ann_type(args[0], module, depth + 1), LISTS[head])
        if head in DICTS:
            return ("dict",)
    return UNKNOWN


def matches(value: Any, t: tuple) -> bool | None:
    """True / False, or None when the annotation can't judge this value."""
    kind = t[0]
    if kind == "any":
        return True
    if kind == "unknown":
        return None
    if kind == "none":
        return value is None
    if kind == "scalar":
        want = t[1]
        if isinstance(value, bool):
            return want is bool
        if want is float:
            return isinstance(value, (int, float))
        return isinstance(value, want)
    if kind == "literal":
        return any(value == v and type(value) is type(v) for v in t[1])
    if kind == "union":
        results = [matches(value, m) for m in t[1]]
        return True if any(r is True for r in results) else False if all(r is False for r in results) else None
    if kind == "list":
        if isinstance(value, str):
            return None if t[2] else False
        if not isinstance(value, list):
            return False
        return _all(matches(v, t[1]) for v in value) if t[1] is not None else True
    if kind == "tuple":
        if not isinstance(value, list):
            return False
        if len(value) != len(t[1]):
            return False
        return _all(matches(v, e) for v, e in zip(value, t[1]))
    if kind == "dict":
        return isinstance(value, dict)
    return None


def _all(results: Any) -> bool | None:
    results = list(results)
    return False if any(r is False for r in results) else True if all(r is True for r in results) else None


def describe(t: tuple) -> str:
    kind = t[0]
    if kind == "scalar":
        return {int: "an int", float: "a number", bool: "true or false", str: "a string"}[t[1]]
    if kind == "none":
        return "null"
    if kind == "literal":
        return "one of " + ", ".join(repr(v) for v in t[1])
    if kind == "union":
        values = _literals(t)
        parts = [describe(m) for m in _flat(t) if m[0] not in ("unknown", "literal")]
        if values:
            parts.insert(0, "one of " + ", ".join(repr(v) for v in dict.fromkeys(values)))
        if "a number" in parts and "an int" in parts:
            parts.remove("an int")
        return " or ".join(dict.fromkeys(parts)) if parts else "another type"
    if kind == "list":
        if t[1] is None or t[1][0] == "unknown":
            return "a list"
        plural = {int: "ints", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural[t[1][1]]}" if t[1][0] == "scalar" else f"a list (items: {describe(t[1])})"
    if kind == "tuple":
        return f"a list of {len(t[1])} items"
    if kind == "dict":
        return "a mapping"
    return "another type"


def _flat(t: tuple) -> list[tuple]:
    return [m for member in t[1] for m in (_flat(member) if member[0] == "union" else [member])]


def _literals(t: tuple) -> list[Any]:
    if t[0] == "literal":
        return list(t[1])
    if t[0] == "union":
        return [v for m in t[1] for v in _literals(m)]
    return []


# --- the check --------------------------------------------------------------------------------------------

def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and ("${" in value or value == "???")


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def check_node(node: dict[str, Any], path: str, sig: Signature, strict: bool = True) -> None:
    """Keys and value types of one node against the signature its target (or schema) declares."""
    short = sig.owner.rsplit(".", 1)[-1]
    for name, value in node.items():
        if name in HYDRA_KEYS:
            continue
        key = _key(path, name)
        param = sig.params.get(name)
        if param is None:
            if sig.open_kwargs:
                continue
            close = difflib.get_close_matches(name, list(sig.params), n=1, cutoff=0.6 if strict else 0.75)
            if not strict and not close:
                continue  # lenient nodes: only near-misses of a known key are typos
            fix = f"did you mean `{_key(path, close[0])}`?" if close else f"remove it; {short} takes: {', '.join(sorted(sig.params)) or 'no keys'}"
            raise ConfigError(key, f"unknown key (value {_show(value)}): {sig.owner} has no parameter {name!r}", fix)
        if key in REWRITTEN or _is_interpolation(value) or (isinstance(value, dict) and "_target_" in value):
            continue
        t = ann_type(param.annotation, param.module)
        ok = matches(value, t)
        if ok is False and value is None and isinstance(param.default, ast.Constant) and param.default.value is None:
            ok = True  # `x: int = None`: None is the documented default
        if ok is False:
            fix = f"set {key} to {describe(t)}"
            choices = [v for v in _literals(t) if isinstance(v, str)]
            close = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
            if close:
                fix = f"did you mean {key}={close[0]}? ({fix})"
            raise ConfigError(key, f"{_show(value)} is not {describe(t)} ({short} declares {name}: {ast.unparse(param.annotation)})", fix)


def _walk(node: Any, path: str, seen_targets: list[str]) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _walk(item, f"{path}[{i}]", seen_targets)
        return
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    if isinstance(target, str) and not _is_interpolation(target):
        sig = target_signature(target)
        if isinstance(sig, str):
            problem, _, close = sig.partition("; ")
            raise ConfigError(_key(path, "_target_"), f"{target!r} does not exist: {problem}", close or "check the module.Class path")
        if sig is not None:
            check_node(node, path, sig)
        seen_targets.append(target)
    elif path in UNTARGETED:
        schema, strict = UNTARGETED[path]
        sig = target_signature(schema)
        if isinstance(sig, Signature):
            if schema.startswith(f"{__name__}."):  # this module's own dataclasses: name the group, not the class
                sig.owner = f"the {path} group" if path else "the top level of the config"
            check_node(node, path, sig, strict=strict)
    for name, value in node.items():
        if (path or name) == "hydra" or name in HYDRA_KEYS:
            continue
        _walk(value, _key(path, name), seen_targets)


def check_model(model: dict[str, Any]) -> None:
    """`model`: keys and types of the family's config dataclass (its own checks run when it is built)."""
    from lmforge.models.registry import FAMILIES

    family = model.get("family", "gpt")
    if family not in FAMILIES or _is_interpolation(family):
        return  # registry.family_classes names the families
    config_path = FAMILIES[family][0].replace(":", ".")
    sig = target_signature(config_path)
    if isinstance(sig, Signature):
        sig.owner = f"family {family} ({config_path.rsplit('.', 1)[-1]})"
        check_node(model, "model", sig)


def check_peft(peft: dict[str, Any]) -> None:
    """`peft`: the keys its method takes (lmforge.peft.apply lists them); values are checked when applied."""
    method = peft.get("method", "none") or "none"
    if method == "none" and set(peft) <= {"method"}:
        return
    from lmforge.peft.apply import COMMON_KEYS, METHOD_KEYS

    allowed = COMMON_KEYS | METHOD_KEYS.get(method, set())
    if method not in METHOD_KEYS:
        return  # normalize_cfg names the methods
    for name, value in peft.items():
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            fix = f"did you mean `peft.{close[0]}`?" if close else f"remove it; peft.method={method} takes: {', '.join(sorted(allowed))}"
            raise ConfigError(f"peft.{name}", f"unknown key (value {_show(value)}) for peft.method={method}", fix)


def check_schema(cfg: DictConfig | dict[str, Any]) -> list[str]:
    """Raise a ConfigError for the first unknown key or mistyped value; returns the `_target_`s checked."""
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    assert isinstance(tree, dict)
    seen: list[str] = []
    _walk(tree, "", seen)
    if isinstance(tree.get("model"), dict) and not tree.get("init_from"):  # init_from: the checkpoint's model replaces it
        check_model(tree["model"])
    if isinstance(tree.get("peft"), dict):
        check_peft(tree["peft"])
    return seen
