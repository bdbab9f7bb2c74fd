"""Config loading: YAML + overrides, and errors that name the field and the allowed values."""

from pathlib import Path

import pytest

from pretrain.config import ConfigError, dump_config, load_config
from pretrain.train import build_model, main

ROOT = Path(__file__).parents[2]
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "sweeps" not in p.parts)
"""Training recipes (configs/sweeps/ holds sweep files: tests/tools/test_sweep.py)."""


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "configs")) for p in RECIPES])
def test_every_recipe_loads_and_builds(recipe):
    import torch

    cfg = load_config(recipe, ["model.vocab_size=1024"])
    with torch.device("meta"):
        from model.gpt import GPT

        model = GPT(cfg.model)
    assert model.num_params() > 0


def test_overrides_parse_yaml_values_and_nest():
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml",
                      ["train.steps=7", "optim.lr=1e-3", "model.structure.mlp={kind: monarch, blocks: 4}",
                       "data.weights=[1, 2]", "data.paths=[a, b]"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3
    assert cfg.model.spec_for("up").kind == "monarch" and cfg.model.spec_for("q").kind == "lowrank"
    assert cfg.data.weights == [1.0, 2.0]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", ["model.vocab_size=512"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.stepz=3", r"train.stepz: unknown key; allowed: \['steps'"),
        ("trian.steps=3", r"trian: unknown key; allowed: \['model', 'data'"),
        ("train.steps=ten", r"train.steps='ten' must be an integer"),
        ("train.steps=0", r"train.steps=0 must be a positive integer"),
        ("optim.schedule=linear", r"optim.schedule='linear' is not allowed; allowed: \['cosine', 'wsd', 'constant'\]"),
        ("train.device=tpu", r"train.device='tpu' is not allowed; allowed: \['auto', 'cpu', 'cuda'\]"),
        ("train.micro_batch=5", r"train.global_batch=16 must be divisible by train.micro_batch=5 x parallel.dp=1"),
        ("parallel.dp=3", r"train.global_batch=16 must be divisible by train.micro_batch=16 x parallel.dp=3"),
        ("parallel.pp_schedule=looped", r"parallel.pp_schedule=.looped. is not allowed; allowed: \[.gpipe., .1f1b."),
        ("parallel.virtual_stages=2", r"parallel.virtual_stages=2 needs parallel.pp_schedule interleaved_1f1b"),
        ("data.seq_len=512", r"data.seq_len=512 exceeds model.max_seq_len=128"),
        ("parallel.tp=3;parallel.sequence_parallel=true",
         r"parallel.sequence_parallel=true splits data.seq_len=128 over parallel.tp=3 ranks; set data.seq_len to a "
         r"multiple of 3"),
        ("train.activation_checkpointing=some", r"train.activation_checkpointing=.some. is not allowed; allowed: "
                                                r"\[.none., .full., .selective.\]"),
        ("train.compile_backend=tvm", r"train.compile_backend=.tvm. is not allowed; allowed: \[.inductor."),
        ("model.n_heads=3", r"model.n_heads=3 must divide model.d_model=128; allowed: \[1, 2, 4, 8"),
        ("model.structure.mlp.kind=butterfly", r"model.structure.mlp: kind='butterfly' is not a registered structure"),
        ("model.structure.mlp.blockz=4", r"model.structure.mlp.blockz: unknown key; allowed: \['kind', 'rank'"),
        ("model.structure.ffn={kind: dense}", r"model.structure.ffn: unknown projection key; allowed:"),
        ("model.structure.attn={kind: lowrank}", r"model.structure.attn: lowrank: required field\(s\) \['rank'\]"),
        ("data.weights=[1, 2]", r"data.weights=\[1.0, 2.0\] needs one non-negative weight per data.paths entry"),
        ("log.progress=maybe", r"log.progress='maybe' must be true or false"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny-cpu.yaml", override.split(";"))


def test_structure_that_does_not_divide_the_model_fails_before_training():
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml",
                      ["model.vocab_size=512", "model.structure.mlp={kind: blockdiag, blocks: 5}"])
    message = (r"gate projection, in=128, out=384\): blockdiag.blocks=5 must divide in_features=128, "
               r"out_features=384; allowed: \[1, 2, 4, 8, 16, 32, 64, 128\]")
    with pytest.raises(ConfigError, match=message):
        build_model(cfg.model, "cpu", 0)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "configs/tiny-cpu.yaml"), "--set", f"data.paths=[{tmp_path}/nope]",
                 "--set", f"train.out_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert "data.paths[0]=" in err and "no token store there" in err and "tools/prepare_data.py" in err
    assert not (tmp_path / "run").exists()


def test_recipe_base_is_deep_merged_and_a_structure_spec_replaced_whole(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 96\n  structure:\n    attn: {kind: lowrank, rank: 32}\n"
                                        "data:\n  paths: [a]\n  seq_len: 64\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  structure:\n    attn: {kind: monarch, blocks: 4}\n"
                                         "data:\n  seq_len: 32\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.model.d_model == 96 and cfg.data.paths == ["a"] and cfg.data.seq_len == 32
    attn = cfg.model.structure["attn"]
    assert attn.kind == "monarch" and attn.blocks == 4 and attn.rank is None  # no rank leaks from lowrank


def test_recipe_base_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml: no such file \(the base of .*a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="base recipes form a cycle"):
        load_config(tmp_path / "b.yaml")
