"""tools/inspect_checkpoint.py: step, topology, config diff, tensors with placements, manifest verification."""

import json
import shutil

from torch.distributed.checkpoint.metadata import ChunkStorageMetadata as Chunk

from tools.inspect_checkpoint import main, placement


def test_placement_reads_the_chunk_layout():
    size = (8, 6)
    assert placement([Chunk(offsets=(0, 0), sizes=(8, 6))], size) == "replicated"
    assert placement([Chunk((0, 0), (4, 6)), Chunk((4, 0), (4, 6))], size) == "Shard(0) x 2"
    assert placement([Chunk((0, i * 2), (8, 2)) for i in range(3)], size) == "Shard(1) x 3"


def test_report_verification_and_config_diff(tiny_args, tmp_path, capsys):
    from pretrain.train import main as train

    run = tmp_path / "run"
    args = tiny_args(run, **{"train.steps": 10})
    assert train(args) == 0
    capsys.readouterr()
    recipe = args[1]
    overrides = [a for a in args[2:] if a != "--set"]
    assert main([str(run / "checkpoints"), "--recipe", recipe, "--set", *overrides[:1], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 10 and report["consumed_samples"] == 80
    assert report["topology"] == {"dp": 1, "tp": 1, "pp": 1}
    assert report["verify"]["problems"] == [] and report["files"] >= 6
    # the recipe with only data.paths overridden differs in the test's tiny shapes
    assert "data.seq_len: checkpoint has 64, recipe has 128" in report["config_diff"], report["config_diff"]
    names = {t["name"]: t for t in report["tensors"]}
    q = names["model.layers.0.attn.q.weight"]
    assert q["shape"] == [64, 64] and q["dtype"] == "float32" and q["placement"] == "replicated"
    assert names["optim.blocks.layers.0.attn.q.weight.exp_avg"]["shape"] == [64, 64]
    assert names["progress.consumed_samples"]["dtype"] == "int64"

    assert main([str(run / "checkpoints"), "--recipe", recipe, "--set", "model.d_model=64"] + sum(
        (["--set", o] for o in overrides), [])) == 0
    assert "config vs recipe: identical" in capsys.readouterr().out

    damaged = tmp_path / "damaged"
    shutil.copytree(run / "checkpoints" / "step_000010", damaged)
    shard = next(damaged.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main([str(damaged)]) == 1
    assert f"DAMAGED:\n    {shard}:" in capsys.readouterr().out


def test_bad_input_is_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "neither a step directory nor a checkpoints root" in capsys.readouterr().err
