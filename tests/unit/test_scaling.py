"""Scaling arithmetic vs published numbers, the law fit on synthetic data, the CLIs, the ladder config."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import load_script

from lmforge import scaling
from lmforge.scaling_fit import fit_scaling_law, param_counts, tokens_seen

ROOT = Path(__file__).resolve().parents[2]


# --- Chinchilla / Kaplan ---------------------------------------------------------------------------------


def test_chinchilla_70b_needs_1_4t_tokens() -> None:
    plan = scaling.chinchilla_optimal(params=70e9)
    assert plan.tokens == pytest.approx(1.4e12)
    assert plan.flops == pytest.approx(5.88e23)  # vs 5.76e23 reported: Gopher's budget, D rounded to 1.4T


def test_chinchilla_gopher_budget_gives_about_70b() -> None:
    plan = scaling.chinchilla_optimal(compute_flops=5.76e23)
    assert plan.params == pytest.approx(70e9, rel=0.05)
    assert plan.tokens / plan.params == pytest.approx(20.0)
    assert scaling.training_flops(plan.params, plan.tokens) == pytest.approx(5.76e23)
    with pytest.raises(ValueError):
        scaling.chinchilla_optimal()


def test_chinchilla_fitted_optimum() -> None:
    """Approach 3 puts the Gopher budget's optimum at a smaller model (~30-40B) trained on more tokens."""
    plan = scaling.chinchilla_optimal_fitted(5.76e23)
    assert 25e9 < plan.params < 45e9
    assert 6 * plan.params * plan.tokens == pytest.approx(5.76e23)
    # optimality: the loss at the fitted N is lower than at N x/÷ 1.5 on the same budget
    loss = scaling.chinchilla_loss(plan.params, plan.tokens)
    for f in (1.5, 1 / 1.5):
        assert loss < scaling.chinchilla_loss(plan.params * f, plan.tokens / f)


def test_chinchilla_and_kaplan_losses() -> None:
    # E + A/N^α + B/D^β at Chinchilla's own (70B, 1.4T): ~1.94 nats
    assert scaling.chinchilla_loss(70e9, 1.4e12) == pytest.approx(
        1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28
    )
    assert scaling.chinchilla_loss(70e9, 1.4e12) == pytest.approx(1.937, abs=0.005)
    assert scaling.kaplan_loss(8.8e13) == pytest.approx(1.0)
    assert scaling.kaplan_loss(tokens=5.4e13) == pytest.approx(1.0)
    assert scaling.kaplan_loss(1e9) == pytest.approx((8.8e13 / 1e9) ** 0.076)
    # with both: approaches L(N) as D -> infinity
    assert scaling.kaplan_loss(1e9, 1e30) == pytest.approx(scaling.kaplan_loss(1e9), rel=1e-6)
    assert scaling.kaplan_loss(1e9, 1e10) > scaling.kaplan_loss(1e9)


def test_flops() -> None:
    assert scaling.training_flops(70e9, 2e12) == pytest.approx(8.4e23)  # LLaMA-2-70B
    assert scaling.flops_per_token(1e6) == 6e6
    assert scaling.flops_per_token(1e6, n_layer=4, d_model=128, seq_len=64) == 6e6 + 12 * 4 * 128 * 64


# --- memory, time, energy ---------------------------------------------------------------------------------


def test_zero_memory_figure_1() -> None:
    """ZeRO paper figure 1: Ψ = 7.5B, N_d = 64: 120 / 31.4 / 16.6 / 1.9 GB."""
    gb = [scaling.training_memory_bytes(7.5e9, stage, 64) / 1e9 for stage in range(4)]
    assert gb[0] == pytest.approx(120.0)
    assert gb[1] == pytest.approx(31.4, abs=0.05)
    assert gb[2] == pytest.approx(16.6, abs=0.05)
    assert gb[3] == pytest.approx(1.875)
    table = scaling.memory_table(7.5e9, 64)
    assert [row["total_gb"] for row in table] == pytest.approx(gb)
    assert scaling.training_memory_bytes(7.5e9, 2, 64, offload=True) == pytest.approx(2 * 7.5e9)
    with pytest.raises(ValueError):
        scaling.training_memory_bytes(1e9, zero_stage=4)


def test_time_energy_co2() -> None:
    hours = scaling.training_time_hours(5.88e23, n_gpus=64, peak_flops_per_gpu=989e12, mfu=0.4)
    assert hours == pytest.approx(5.88e23 / (64 * 989e12 * 0.4) / 3600)
    assert scaling.energy_kwh(8, 10.0, 700.0, pue=1.1) == pytest.approx(61.6)  # 8 × 10 h × 0.7 kW × 1.1
    assert scaling.co2_kg(1000.0, 400.0) == pytest.approx(400.0)
    spec = scaling.gpu_spec("H100-PCIe")
    assert (spec.name, spec.bf16_flops, spec.fp8_flops, spec.watts) == ("h100 pcie", 756e12, 1513e12, 350.0)
    assert scaling.gpu_spec("b200").fp8_flops == 4500e12
    assert scaling.gpu_spec("a100").fp8_flops is None
    with pytest.raises(KeyError):
        scaling.gpu_spec("tpu v5")


def test_human_units() -> None:
    assert scaling.human(70e9) == "70B"
    assert scaling.human(1.4e12) == "1.4T"
    assert scaling.human(5.76e23, "FLOPs") == "5.76e23 FLOPs"


# --- fitting ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_scipy", [True, False])
def test_fit_recovers_power_law(use_scipy: bool) -> None:
    if use_scipy:
        pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    n = np.logspace(5, 9, 10)
    loss = 1.8 + 300.0 / n**0.35 + rng.normal(0, 0.003, n.size)
    fit = fit_scaling_law(n, loss, use_scipy=use_scipy)
    assert fit.form == "L(N)"
    assert fit.params["E"] == pytest.approx(1.8, abs=0.02)
    assert fit.params["alpha"] == pytest.approx(0.35, abs=0.01)
    assert fit.params["A"] == pytest.approx(300.0, rel=0.1)
    assert all(0 < fit.stderr[k] < 0.1 * abs(fit.params[k]) + 0.01 for k in ("E", "alpha"))
    assert fit.rmse < 0.005


@pytest.mark.parametrize("use_scipy", [True, False])
def test_fit_recovers_chinchilla_nd(use_scipy: bool) -> None:
    if use_scipy:
        pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    n = np.repeat(np.logspace(6, 9, 4), 3)
    d = np.tile(np.logspace(8, 11, 3), 4)
    loss = scaling.chinchilla_loss(n, d) + rng.normal(0, 0.002, n.size)
    fit = fit_scaling_law(n, loss, d, use_scipy=use_scipy)
    assert fit.form == "L(N,D)"
    assert fit.params["E"] == pytest.approx(1.69, abs=0.03)
    assert fit.params["alpha"] == pytest.approx(0.34, abs=0.02)
    assert fit.params["beta"] == pytest.approx(0.28, abs=0.02)
    assert fit.predict([70e9], [1.4e12])[0] == pytest.approx(scaling.chinchilla_loss(70e9, 1.4e12), abs=0.02)


def test_fit_needs_enough_points() -> None:
    with pytest.raises(ValueError):
        fit_scaling_law([1e6, 1e7], [3.0, 2.5])


# --- runs -> points, the fit script ---------------------------------------------------------------------

LLAMA = yaml.safe_load((ROOT / "conf" / "model" / "llama-tiny.yaml").read_text()) | {"vocab_size": 4096}


def _fake_run(path: Path, model: dict, loss: float, max_steps: int = 100) -> Path:
    path.mkdir(parents=True)
    cfg = {
        "model": model,
        "data": {"batch_size": 16, "block_size": 64},
        "trainer": {"max_steps": max_steps, "devices": 1, "num_nodes": 1, "accumulate_grad_batches": 1},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "metrics.json").write_text(json.dumps({"val/loss": loss, "val/bpb": loss / 2}))
    return path


def test_param_counts_and_tokens() -> None:
    non_emb, n_flops = param_counts(LLAMA)
    assert n_flops == 1_262_720  # llama-tiny with its tied 4096 × 128 table (the FLOPs N)
    assert non_emb == n_flops - 4096 * 128
    cfg = {
        "data": {"batch_size": 16, "block_size": 64},
        "trainer": {"max_steps": 600, "accumulate_grad_batches": 2},
    }
    assert tokens_seen(cfg) == 600 * 16 * 64 * 2
    assert tokens_seen(cfg, last_step=99) == 100 * 16 * 64 * 2  # stopped early: the CSV's last step wins


def test_fit_script_on_fake_ladder(tmp_path: Path) -> None:
    fit_scaling = load_script("fit_scaling")
    for i, (layers, width, heads) in enumerate([(2, 64, 2), (3, 96, 4), (4, 128, 4), (4, 192, 6)]):
        model = LLAMA | {"n_layer": layers, "n_embd": width, "n_head": heads, "n_kv_head": heads // 2}
        n, _ = param_counts(model)
        _fake_run(tmp_path / "multirun" / str(i), model, 2.0 + 40.0 / n**0.3)
    out = tmp_path / "fit.png"
    result = fit_scaling.main([str(tmp_path / "multirun"), "--json", "--out", str(out)])
    assert len(result["runs"]) == 4
    assert result["fit"]["form"] == "L(N)"
    assert result["fit"]["params"]["alpha"] == pytest.approx(0.3, abs=0.02)
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.stat().st_size > 1000


def test_scaling_laws_json(capsys: pytest.CaptureFixture[str]) -> None:
    scaling_laws = load_script("scaling_laws")
    scaling_laws.main(["--params", "70e9", "--gpus", "64", "--gpu", "h100", "--mfu", "0.4", "--json"])
    out = json.loads(capsys.readouterr().out)
    for key in (
        "params",
        "tokens",
        "flops",
        "memory_gb_per_gpu",
        "hours",
        "kwh",
        "co2_kg",
        "chinchilla_20x",
        "chinchilla_fitted",
        "loss_chinchilla",
        "loss_kaplan",
        "memory_table",
    ):
        assert key in out
    assert out["tokens"] == pytest.approx(1.4e12)
    assert out["flops"] == pytest.approx(5.88e23)
    assert out["memory_gb_per_gpu"] == pytest.approx(16 * 70)
    assert out["kwh"] == pytest.approx(64 * out["hours"] * 0.7 * 1.1)
    # two of N, D, C fix the third
    plan = scaling_laws.main(["--compute", "8.4e23", "--tokens", "2e12", "--json"])
    assert plan["params"] == pytest.approx(70e9)
    assert math.isclose(plan["tokens_per_param"], 2e12 / 70e9)


def test_scaling_ladder_composes() -> None:
    """Every rung of the multirun sweep composes into a model that builds (valid head counts)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=scaling_ladder"], return_hydra_config=True)
    sizes = str(cfg.hydra.sweeper.params["ladder.size"]).split(",")
    assert len(sizes) >= 4 and cfg.task_name == "scaling_ladder"
    counts = []
    for size in sizes:  # the model keys interpolate ladder.sizes[ladder.size]: what the sweep override sets
        cfg.ladder.size = size
        model = {**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": 4096}
        assert model["n_layer"] == cfg.ladder.sizes[size].n_layer
        counts.append(param_counts(model)[0])
    assert counts == sorted(counts) and counts[-1] > 20 * counts[0]


def test_fit_script_fits_l_nd_when_budgets_vary(tmp_path: Path) -> None:
    """A fake 3 sizes × 3 budgets ladder (what experiment=scaling_ladder_nd runs): auto picks L(N,D) and recovers
    the law the losses were made from; the plot draws one curve per budget."""
    fit_scaling = load_script("fit_scaling")
    true = {"E": 2.0, "A": 40.0, "alpha": 0.3, "B": 300.0, "beta": 0.35}
    for i, (layers, width, heads) in enumerate([(2, 64, 2), (3, 96, 4), (4, 128, 4)]):
        model = LLAMA | {"n_layer": layers, "n_embd": width, "n_head": heads, "n_kv_head": heads // 2}
        n, _ = param_counts(model)
        for steps in (100, 200, 400):
            d = steps * 16 * 64
            loss = true["E"] + true["A"] / n ** true["alpha"] + true["B"] / d ** true["beta"]
            _fake_run(tmp_path / "multirun" / f"{i}_{steps}", model, loss, max_steps=steps)
    out = tmp_path / "fit.png"
    result = fit_scaling.main([str(tmp_path / "multirun"), "--json", "--out", str(out)])
    assert len(result["runs"]) == 9 and result["fit"]["form"] == "L(N,D)" and result["fit"]["rmse"] < 1e-3
    for key in ("E", "alpha", "beta"):
        assert result["fit"]["params"][key] == pytest.approx(true[key], abs=0.02), key
    for key in ("A", "B"):
        assert result["fit"]["params"][key] == pytest.approx(true[key], rel=0.1), key
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.stat().st_size > 1000
