"""The typed config schema (lmforge.config_schema): every shipped config passes it, its signatures (read from
source with `ast`) agree with `inspect.signature` of the real targets, and the type rules judge plain YAML values."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lmforge.config_schema import Signature, ann_type, check_schema, matches, target_signature
from lmforge.errors import ConfigError


def yaml_targets(node: object) -> set[str]:
    if isinstance(node, dict):
        own = {node["_target_"]} if isinstance(node.get("_target_"), str) and "${" not in node["_target_"] else set()
        return own.union(*(yaml_targets(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(yaml_targets(v) for v in node))
    return set()


@pytest.fixture(scope="module")
def checked_targets() -> set[str]:
    """Every `_target_` written in conf/ (Hydra's own nodes aside). tests/unit/test_config.py runs the schema over
    every option of every group composed into the default config; the sweep group is composed here."""
    targets: set[str] = set()
    for path in CONF.rglob("*.yaml"):
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(tree, dict):
            tree.pop("hydra", None)
        targets |= yaml_targets(tree)
    return targets


def test_sweep_config_passes_the_schema() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=lr_wd"])
    assert "lightning.pytorch.Trainer" in check_schema(cfg)


def test_signatures_read_from_source_agree_with_inspect(checked_targets: set[str]) -> None:
    """What the schema reads with `ast` is what Python would accept: the same keyword parameters, plus those a
    `**kwargs` forwards to the base class."""
    unresolved = []
    for target in sorted(checked_targets):
        module, name = target.rsplit(".", 1)
        try:
            obj = getattr(importlib.import_module(module), name)
        except ImportError:  # optional dependency (deepspeed) not installed
            continue
        sig = target_signature(target)
        if not isinstance(sig, Signature):
            unresolved.append(target)
            continue
        real = inspect.signature(obj).parameters.values()
        named = {p.name for p in real if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        var_kw = any(p.kind == p.VAR_KEYWORD for p in real)
        assert named <= set(sig.params), (target, named - set(sig.params))
        if not var_kw:
            assert set(sig.params) == named and not sig.open_kwargs, target
    assert not unresolved, unresolved
    assert len(checked_targets) > 30, checked_targets


@pytest.mark.parametrize("annotation,value,expected", [
    ("int", 3, True), ("int", 3.0, False), ("int", True, False), ("int", "3", False),
    ("float", 3, True), ("float", "3e-4", False), ("bool", 1, False), ("bool", False, True),
    ("Optional[int]", None, True), ("int | None", None, True), ("int", None, False),
    ("Literal['a', 'b']", "a", True), ("Literal['a', 'b']", "c", False), ("Literal[1, 2]", True, False),
    ("Union[int, str]", "x", True), ("list[int]", [1, 2], True), ("list[int]", [1, "x"], False),
    ("list[str]", "abc", False), ("Sequence[str]", "abc", None), ("tuple[float, float]", [0.9, 0.95], True),
    ("tuple[float, float]", [0.9], False), ("tuple[int, ...]", [1, 2, 3], True), ("dict[str, int]", {"a": 1}, True),
    ("Mapping[str, Any]", [1], False), ("Any", object(), True), ("'int'", 1, True),
    ("Path", "x", None), ("Union[str, Path]", 3, None), ("Callable[..., Any]", "f", None),
])
def test_annotation_rules(annotation: str, value: object, expected: bool | None) -> None:
    t = ann_type(ast.parse(annotation, mode="eval").body, "lmforge.config_schema")
    assert matches(value, t) is expected


def test_aliases_are_followed_across_modules() -> None:
    """Trainer's `precision: Optional[_PRECISION_INPUT]` is a Literal union defined in lightning.fabric."""
    sig = target_signature("lightning.pytorch.Trainer")
    assert isinstance(sig, Signature)
    t = ann_type(sig.params["precision"].annotation, sig.params["precision"].module)
    assert matches("bf16-mixed", t) is True and matches("bf16-mixd", t) is False


def test_open_kwargs_interpolations_and_nested_targets() -> None:
    check_schema({"logger": {"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "entity": "me", "anything": 1}}})
    check_schema({"trainer": {"_target_": "lightning.pytorch.Trainer", "max_steps": "${oc.env:STEPS}", "devices": "???"}})
    with pytest.raises(ConfigError, match=r"data.corpus.val_play: unknown key .*did you mean `data.corpus.val_plays`"):
        check_schema({"data": {"_target_": "lmforge.data.datamodule.PackedTextDataModule",
                               "corpus": {"_target_": "lmforge.data.corpus.ShakespeareCorpus", "val_play": []}}})


def test_top_level_helper_nodes_pass_but_typos_do_not() -> None:
    check_schema({"seed": 1, "ladder": {"size": "2x64"}})  # experiment=scaling_ladder's helper node
    with pytest.raises(ConfigError, match="task_nme: unknown key .*did you mean `task_name`"):
        check_schema({"task_nme": "x"})
    with pytest.raises(ConfigError, match=r"matmul_precision: 'hi' is not one of 'highest', 'high', 'medium' .*Fix: did you mean"):
        check_schema({"matmul_precision": "hi"})
    with pytest.raises(ConfigError, match=r"cpu_kernels: 'mkl' is not one of 'lmforge', 'torch'"):
        check_schema({"cpu_kernels": "mkl"})


def test_the_schema_reads_source_only() -> None:
    """No target is imported to read its signature (importing Lightning alone takes seconds)."""
    import subprocess
    import sys

    code = ("import sys; from lmforge.config_schema import check_schema, target_signature;"
            "check_schema({'trainer': {'_target_': 'lightning.pytorch.Trainer', 'max_steps': 3},"
            " 'stage': {'_target_': 'lmforge.stages.dpo.DPOStage', 'beta': 0.1}});"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torch', 'lmforge')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=Path(CONF).parent)
    assert out.returncode == 0, out.stderr
    assert "lightning" not in out.stdout and "torch" not in out.stdout, out.stdout


def test_a_method_only_mixin_before_the_base_does_not_hide_its_arguments(tmp_path, monkeypatch) -> None:
    """`class S(Mixin, DDPStrategy)`: the mixin has no __init__, so the base's (and DDP's, through it) still apply."""
    (tmp_path / "mixin_strategy.py").write_text(
        "from lightning.pytorch.strategies import DDPStrategy\n\n"
        "class Mixin:\n    def on_exception(self, exception):\n        super().on_exception(exception)\n\n"
        "class WithInit:\n    def __init__(self, x=1):\n        pass\n\n"
        "class S(Mixin, DDPStrategy):\n    def __init__(self, async_save=False, **kwargs):\n        super().__init__(**kwargs)\n\n"
        "class T(WithInit, DDPStrategy):\n    def __init__(self, **kwargs):\n        super().__init__(**kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sig = target_signature("mixin_strategy.S")
    assert isinstance(sig, Signature) and not sig.open_kwargs
    assert {"async_save", "process_group_backend", "find_unused_parameters"} <= set(sig.params)
    first = target_signature("mixin_strategy.T")  # a first base with an __init__ of its own: that is what super() calls
    assert isinstance(first, Signature) and set(first.params) == {"x"} and not first.open_kwargs
