"""The benchmark tools run end to end on a tiny model (their numbers are reported, not asserted)."""

from pathlib import Path

import pytest

from tools import (
    bench_checkpoint,
    bench_kernels,
    bench_memory,
    bench_optim,
    bench_sparsity,
    bench_step,
    bench_structures,
)

ROOT = Path(__file__).parents[2]


def _rows(out: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header = rows[0][0].strip() if rows else None
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows if r[0].strip() != header}


def test_bench_structures_prints_ratios_to_dense(tiny_store, capsys):
    args = ["--config", str(ROOT / "configs/tiny-cpu.yaml"), "--steps", "4", "--structures", "lowrank,nm",
            "--data", str(tiny_store)]
    assert bench_structures.main(args) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"dense", "lowrank", "nm"} and rows["dense"][1] == "1.00"
    assert 0 < float(rows["lowrank"][1]) < 1  # fewer parameters than dense
    mfu, executed = (float(rows["lowrank"][i]) for i in (6, 7))
    assert mfu == executed > 0  # low-rank products execute exactly the structure's FLOPs
    mfu, executed = (float(rows["nm"][i]) for i in (6, 7))
    assert executed > 1.3 * mfu  # 2:4 runs a dense masked product here: the hardware does twice the structure's work


def test_bench_memory_startup_falls_with_tp(capsys):
    args = ["--config", str(ROOT / "configs/tiny-cpu.yaml"), "--vocab-size", "512", "--tables",
            "startup,activations", "--topologies", "1x1,2x1", "--seq-len", "64"]
    assert bench_memory.main(args) == 0
    rows = _rows(capsys.readouterr().out)
    one, two = (float(rows[k][3].replace(",", "")) for k in ("1 x 1", "2 x 1"))  # sharded peak per rank, MiB
    assert two < one
    assert float(rows["full"][0]) < float(rows["none"][0])  # checkpointing keeps fewer activations
    assert bench_memory.main(["--tables", "nope"]) == 2


@pytest.mark.slow
def test_bench_memory_engines_show_what_zero3_and_offload_leave_on_the_device(tmp_path, capsys):
    pytest.importorskip("deepspeed")
    plot = tmp_path / "engines.png"
    args = ["--config", str(ROOT / "configs/tiny-cpu.yaml"), "--vocab-size", "512", "--tables", "engines",
            "--engine-dp", "2", "--engine-precisions", "fp32", "--seq-len", "64", "--plot-engines", str(plot)]
    assert bench_memory.main(args) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == list(bench_memory.ENGINES) and rows["native"][1] == "1.00"
    assert float(rows["zero3+offload"][3]) < 0.5  # on the device: parameters and optimizer partitions went to host
    assert plot.stat().st_size > 0
    assert bench_memory.main(["--tables", "engines", "--engine-precisions", "fp16"]) == 2


def test_bench_step_times_checkpointing_against_none(tiny_store, capsys):
    args = ["--configs", str(ROOT / "configs/tiny-cpu.yaml"), "--steps", "4", "--checkpointing", "none,full",
            "--modes", "eager", "--data", str(tiny_store), "--set", "train.micro_batch=4", "--set",
            "train.global_batch=4", "--set", "data.seq_len=64"]
    assert bench_step.main(args) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["tiny-cpu eager none"][1] == "1.00"
    assert float(rows["tiny-cpu eager full"][3]) == 0.0  # recomputation changes no loss
    assert bench_step.main(["--modes", "jit"]) == 2


def test_bench_optim_sweeps_learning_rates_and_judges_the_mlbfgs_claim(tiny_store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    plot = tmp_path / "optim.png"
    args = ["--steps", "4", "--eval-interval", "2", "--optimizers", "adamw,mlbfgs,sgd", "--lrs", "adamw=3e-3",
            "--lrs", "mlbfgs=0.1,0.3", "--lrs", "sgd=0.3", "--big-config", "none", "--plot", str(plot),
            "--set", f"data.paths=[{tiny_store}]"]
    assert bench_optim.main(args) == 0
    out = capsys.readouterr().out
    sweep = [line for line in out.splitlines() if line.startswith("| mlbfgs | 0.1: ")]
    assert len(sweep) == 1 and "0.3: " in sweep[0], out  # the sweep is printed
    rows = _rows(out)  # the main table's rows (printed after the sweep's)
    assert {"adamw", "mlbfgs", "sgd"} <= set(rows)
    assert rows["adamw"][2] == "+0.000" and rows["adamw"][5] == "1.00" and rows["adamw"][3] == "4"
    assert float(rows["mlbfgs"][0]) in (0.1, 0.3) and float(rows["mlbfgs"][7]) > 10  # history: > 10x AdamW's state
    assert "- vs sgd: " in out and "- vs adamw: " in out and plot.exists()
    assert bench_optim.main(["--lrs", "adamw=-1", "--big-config", "none"]) == 2


def test_bench_checkpoint_prints_manifest_cost(tmp_path, capsys):
    assert bench_checkpoint.main(["--mb", "8", "--repeat", "1", "--dir", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"save", "dcp write", "manifest", "dcp read", "verify"}
    assert rows["dcp write"][2] == "1.00" and rows["dcp read"][3] == "1.00"
    assert bench_checkpoint.main(["--mb", "1"]) == 2


@pytest.mark.slow
def test_bench_sparsity_prints_the_schedule_table_and_a_verdict(tiny_store, tmp_path, capsys, monkeypatch):
    from tests.conftest import tiny_overrides

    monkeypatch.chdir(ROOT)
    over = [o for o in tiny_overrides(tiny_store, tmp_path) if not o.startswith(("train.out_dir", "train.steps",
                                                                                  "train.eval_interval"))]
    args = ["--steps", "20", "--target", "0.5", "--interval", "2", "--plot", str(tmp_path / "p.png"),
            *sum((["--set", o] for o in over), [])]
    assert bench_sparsity.main(args) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {"dense", "static", "gmp-early", "gmp-25-75", "gmp-late", "nm-ste", "nm-srste", "nm-mdgf",
                         "nm-sdgf", "lowrank", "lowrank-guided", "lowrank-guided-stochastic"}
    gmp = ("static", "gmp-early", "gmp-25-75", "gmp-late")
    assert rows["dense"][0] == "1.000" and all(abs(float(rows[n][0]) - 0.5) < 0.01 for n in gmp)
    assert float(rows["static"][3]) < float(rows["gmp-late"][3]) < 1.0  # average parameters: late prunes last
    assert rows["dense"][3] == "1.00" and rows["dense"][5] == "1.00"
    assert "claim: gmp over 25-75% of training" in out
    # 2:4 ends at half the projection weights; mask decay and structure decay apply more of them on the way
    assert all(rows[n][0] == "0.500" for n in ("nm-ste", "nm-srste", "nm-mdgf", "nm-sdgf"))
    assert rows["nm-ste"][3] == rows["nm-srste"][3] < rows["nm-sdgf"][3] and rows["nm-ste"][3] < rows["nm-mdgf"][3]
    assert out.count("ends below plain STE for 2:4") == 3
    # the guide adds a dense matrix per projection for the first half: more average parameters and FLOPs
    assert float(rows["lowrank"][5]) < float(rows["lowrank-guided-stochastic"][5]) <= float(rows["lowrank-guided"][5])
    assert float(rows["lowrank"][3]) < float(rows["lowrank-guided"][3])
    assert rows["lowrank"][1] == rows["lowrank-guided"][1]
    assert out.count("ends below plain low-rank at equal steps") == 2
    assert bench_sparsity.main(["--target", "0"]) == 2


def test_bench_kernels_prints_product_and_block_sparsity_ratios(capsys, monkeypatch):
    monkeypatch.setenv("STRUCTORCH_KERNELS", "reference")
    args = ["--recipes", "gpt2-small", "--products", "lowrank", "--tokens", "16", "--reps", "1", "--block-sizes", "128"]
    assert bench_kernels.main(args) == 0
    out = capsys.readouterr().out
    tables = [line for line in out.splitlines() if line.startswith("| gpt2-small")]
    products = [t for t in tables if "lowrank" in t]
    blocks = [t.strip("|").split("|") for t in tables if "lowrank" not in t]
    assert len(products) == 3 and len(blocks) == 3 * 2  # three shapes, densities 0.5 and 0.25
    assert {b[3].strip() for b in blocks} == {"0.5", "0.25"} and all(float(b[4]) > 0 for b in blocks)
    assert {b[7].strip() for b in blocks if b[3].strip() == "0.25"} == {"kept blocks"}
    assert {b[7].strip() for b in blocks if b[3].strip() == "0.5"} == {"masked dense"}
    assert bench_kernels.main(["--block-sizes", "0,x"]) == 2


@pytest.mark.slow
def test_bench_data_prints_memory_and_speed_ratios_and_the_loader_ratio(tmp_path, capsys):
    from tools import bench_data

    args = ["--scales", "1,2", "--num-procs", "1", "--base-files", "30", "--vocab-size", "512",
            "--trainer-config", str(ROOT / "configs/tiny-cpu.yaml"), "--seq-len", "64", "--micro-batch", "1",
            "--loader-batches", "3", "--plot", str(tmp_path / "data.png")]
    assert bench_data.main(args) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert {"1x", "2x"} <= set(rows), out
    assert rows["1x"][5] == "1.00" and rows["1x"][6] == "1.00"  # memory and speed against themselves
    assert 0.5 < float(rows["2x"][5]) < 2  # memory does not double with the corpus
    assert (tmp_path / "data.png").stat().st_size > 0
    loader = [line for line in out.splitlines() if line.startswith("| ") and line.count("|") == 4][-1]
    assert float(loader.split("|")[3].replace(",", "")) > 1  # the loader outruns the trainer
