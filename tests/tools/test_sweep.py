"""Scaling-law sweeps: the fit recovers a known law, budgets plan to their FLOPs, the runner is idempotent across
a kill, the SLURM array script is valid, bad sweep files stop with the field named, the report is written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tools import sweep as sw
from tools.scaling import fit_law

ROOT = Path(__file__).parents[2]


def test_fit_recovers_a_known_law_from_noisy_points(tmp_path, capsys):
    rng = np.random.default_rng(0)
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28  # Chinchilla's published fit
    n = np.exp(rng.uniform(np.log(1e6), np.log(1e10), 150))
    d = np.exp(rng.uniform(np.log(1e8), np.log(1e12), 150))
    loss = (E + A / n**alpha + B / d**beta) * np.exp(rng.normal(0.0, 0.005, 150))
    law = fit_law(n, d, loss, bootstrap=30)
    assert abs(law.alpha - alpha) < 0.02 and abs(law.beta - beta) < 0.02 and abs(law.E - E) < 0.05, law
    assert law.intervals["alpha"][0] <= law.alpha <= law.intervals["alpha"][1]
    # the same through the CLI from any CSV with params,tokens,loss
    csv = tmp_path / "published.csv"
    csv.write_text("params,tokens,loss\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(n, d, loss)))
    assert sw.main(["fit", "--points", str(csv), "--out", str(tmp_path / "fit.json"), "--bootstrap", "10"]) == 0
    fitted = json.loads((tmp_path / "fit.json").read_text())["approach3"]
    assert abs(fitted["alpha"] - alpha) < 0.02 and abs(fitted["beta"] - beta) < 0.02
    assert "approach 3" in capsys.readouterr().out
    (tmp_path / "bad.csv").write_text("params,loss\n1,2\n")
    assert sw.main(["fit", "--points", str(tmp_path / "bad.csv")]) == 2


def _recipe(tmp_path: Path, store: Path) -> Path:
    base = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    base["data"]["paths"] = [str(store)]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _sweep(tmp_path: Path, store: Path, **extra) -> Path:
    _recipe(tmp_path, store)
    spec = {"base": "recipe.yaml", "out_dir": str(tmp_path / "out"),
            "axes": {"size": {"s": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 96},
                              "m": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192}},
                     "structure": {"dense": {"default": {"kind": "dense"}},
                                   "lowrank": {"default": {"kind": "lowrank", "rank": 8}}}},
            "overrides": ["train.global_batch=4", "train.micro_batch=4", "data.seq_len=32", "model.max_seq_len=32",
                          "train.eval_interval=10", "train.eval_batches=2", "checkpoint.interval=10",
                          "log.progress=false", "log.tensorboard=false", "optim.warmup_steps=2"],
            "executor": {"workers": 1, "threads": 1}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_budgets_plan_points_whose_flops_equal_the_budget_within_a_step(tiny_store, tmp_path):
    sweep = sw.load_sweep(_sweep(tmp_path, tiny_store, budgets=[2.0e9, 6.0e9]))
    points = sw.plan(sweep)
    assert len(points) == 2 * 2 * 2 and {p.budget for p in points} == {2.0e9, 6.0e9}
    for p in points:
        per_step = p.train_flops_per_token * p.tokens / p.steps
        assert abs(p.flops - p.budget) <= per_step / 2 + 1, (p.id, p.flops, p.budget)
    assert len({p.steps for p in points}) > 2  # smaller models take more steps for the same budget


@pytest.mark.parametrize("change,message", [
    ({"axes": {"width": [1]}}, r"unknown axis \['width'\]; allowed"),
    ({"axes": {"size": {}}}, r"axes.size is empty"),
    ({"exclude": [{"structure": "dense"}, {"structure": "lowrank"}]}, r"the grid is empty"),
    ({"budgets": [1.0e3]}, r"budgets: 1e\+03 FLOPs is below one step of point"),
    ({"base": "missing.yaml"}, r"base=missing.yaml: no recipe at"),
    ({"color": 1}, r"unknown key\(s\) \['color'\]"),
])
def test_bad_sweep_files_stop_with_the_field_named(change, message, tiny_store, tmp_path, capsys):
    path = _sweep(tmp_path, tiny_store)
    spec = yaml.safe_load(path.read_text())
    for k, v in change.items():
        spec[k] = {**spec[k], **v} if k == "axes" else v
    if "budgets" not in change:
        spec.setdefault("axes", {})["steps"] = [4]
    path.write_text(yaml.safe_dump(spec))
    assert sw.main(["plan", str(path)]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_killed_runner_resumes_without_redoing_finished_points_then_reports(tiny_store, tmp_path, capsys):
    path = _sweep(tmp_path, tiny_store, axes=None)
    spec = yaml.safe_load(path.read_text())
    spec["axes"] = {"size": {"s": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 96},
                             "m": {"d_model": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 144},
                             "l": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192}},
                    "structure": {"dense": {"default": {"kind": "dense"}},
                                  "lowrank": {"default": {"kind": "lowrank", "rank": 8}}},
                    "steps": [30]}
    path.write_text(yaml.safe_dump(spec))
    sweep = sw.load_sweep(path)
    points = sw.plan(sweep)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runner = subprocess.Popen([sys.executable, str(ROOT / "tools/sweep.py"), "run", str(path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = Path(points[0].dir) / "done.json"
    deadline = time.time() + 300
    while not first.is_file() and time.time() < deadline:
        time.sleep(0.5)
    assert first.is_file(), "the first point did not finish"
    os.killpg(runner.pid, signal.SIGKILL)  # the runner and the trainer of the point it was running
    runner.wait()
    stamp = first.stat().st_mtime_ns
    states = [sw.state(p)["state"] for p in points]
    assert states[0] == "done" and "done" not in states[2:]  # killed midway
    # the SLURM array covers exactly the unfinished points and is valid bash
    assert sw.main(["run", str(path), "--executor", "slurm", "--dry-run"]) == 0
    script = capsys.readouterr().out
    todo = [p for p in points if sw.state(p)["state"] != "done"]
    assert f"#SBATCH --array=0-{len(todo) - 1}%8" in script
    assert script.count("exec bash launch/slurm.sbatch") == len(todo)
    assert points[0].dir not in script and all(p.dir in script for p in todo)
    (tmp_path / "array.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "array.sbatch")]).returncode == 0
    # run again: finishes the rest, does not touch the finished point
    assert sw.main(["run", str(path)]) == 0
    assert first.stat().st_mtime_ns == stamp and all(sw.state(p)["state"] == "done" for p in points)
    assert sw.main(["status", str(path)]) == 0
    assert capsys.readouterr().out.count("| done |") == len(points)
    assert sw.main(["report", str(path), "--bootstrap", "5"]) == 0
    report = tmp_path / "out" / "report"
    assert (report / "loss_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert (report / "loss_vs_avg_params.png").is_file() and "## Fits" in (report / "report.md").read_text()
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(points) and rows[0].startswith("id,structure,size,sparsity,budget,params")
    assert any((tmp_path / "out" / "tb").rglob("events.out.tfevents.*"))


def test_a_failed_point_shows_its_error_line_and_the_others_go_on(tiny_store, tmp_path, capsys):
    path = _sweep(tmp_path, tiny_store)
    spec = yaml.safe_load(path.read_text())
    spec["axes"] = {"structure": {"dense": {"default": {"kind": "dense"}}}, "steps": [2],
                    "size": {"s": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_ff": 96}},
                    "lr": {"ok": 0.003, "gpu": 0.001}}
    spec["exclude"] = []
    path.write_text(yaml.safe_dump(spec))
    points = sw.plan(sw.load_sweep(path))
    bad = next(p for p in points if p.labels["lr"] == "gpu")
    bad.overrides.append("train.device=cuda")  # valid config, fails when the run starts on this machine
    sweep = sw.load_sweep(path)
    assert sw.run(sweep, points, "local", dry_run=False) == 1
    assert sw.state(bad)["state"] == "failed" and "train.device=cuda" in sw.state(bad)["error"]
    assert [sw.state(p)["state"] for p in points if p is not bad] == ["done"]
    table = sw.status_table(points)
    assert "| failed |" in table and "train.device=cuda" in table and "| done |" in table


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load(path):
    sweep = sw.load_sweep(path)
    assert sweep.base.is_file() and sweep.axes and (sweep.budgets or "steps" in sweep.axes or "tokens" in sweep.axes)
