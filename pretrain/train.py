"""Train a structured GPT.

Usage:
    python -m pretrain.train --config configs/tiny-cpu.yaml
    python -m pretrain.train --config configs/tiny-cpu.yaml --set model.structure.mlp.kind=blast \\
        --set model.structure.mlp.blocks=4 --set model.structure.mlp.rank=32 --set train.steps=500
    python -m pretrain.train --config configs/tiny-cpu.yaml --resume auto

The run directory ``train.out_dir`` receives ``config.yaml`` (resolved), ``checkpoints/``, ``tb/``
(TensorBoard) and ``metrics.jsonl``. Bad input stops before training with exit code 2.
"""

import argparse
import contextlib
import copy
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.gpt import GPT
from model.structured import StructureError, spec_params, structure_class
from parallel.comm import CommStats
from parallel.init import ShardedInit
from parallel.mesh import ParallelDims, TopologyError, init_distributed
from parallel.runtime import ParallelModel
from pretrain.checkpoint import (
    Checkpointer,
    CheckpointError,
    GlobalView,
    ModelState,
    OptimizerState,
    RNGState,
    Stateful,
    check_model_config,
    load_verified,
    step_dirs,
)
from pretrain.config import Config, ConfigError, UserError, dump_config, load_config, to_dict
from pretrain.data import Corpus, Prefetcher
from pretrain.metrics import Metrics, peak_tflops
from pretrain.optim import build_optimizer
from pretrain.schedules import lr_at
from pretrain.sparsity import (
    SparsitySchedule,
    conversion_steps,
    conversions_due,
    dense_first,
    describe,
    enable_pruning,
    merge_pp,
)
from pretrain.tokenizer import tokenizer_files


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> GPT:
    """Build on ``meta``, materialise on ``device``, initialise every weight from ``seed``."""
    model = build_meta(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def build_meta(cfg: ModelConfig) -> GPT:
    """The model on ``meta`` (shapes only); a bad structure is a ``ConfigError``."""
    try:
        with torch.device("meta"):
            return GPT(cfg)
    except (StructureError, ValueError) as e:
        raise ConfigError(str(e)) from None


def build_parallel(cfg: Config, dims: ParallelDims, device: torch.device, local_batch: int,
                   sharded: bool = True) -> tuple[ParallelModel, int, dict[str, int]]:
    """The model of ``cfg`` as this rank runs it on ``dims`` (a built mesh), with the full model's parameter count
    and FLOPs per token. ``sharded``: built on ``meta`` and each rank fills only its shards and stages
    (``parallel/init.py``); else the whole model is initialised on every rank, then sliced (the reference the
    sharded path equals bit for bit, and what ``tools/bench_memory.py`` compares against)."""
    t, par, rules = cfg.train, cfg.parallel, cfg.sparsity.rules
    plain = build_meta(dense_first(cfg.model, rules, t.steps, 0))
    init = None
    if sharded:
        model = copy.deepcopy(plain)
        enable_pruning(model.structured_layers(), rules)  # on meta: bad rules stop here, before any work
        init = ShardedInit(plain, t.seed, lambda name, layer: enable_pruning({name: layer}, rules))
    else:
        model = plain.to_empty(device=torch.device("cpu"))
        model.init_weights(t.seed)
        enable_pruning(model.structured_layers(), rules)
        full = (model.num_params(), model.flops_per_token(cfg.data.seq_len))  # before sharding slices it
    try:
        parallel = ParallelModel(model, dims, device, t.micro_batch, local_batch, par.pp_schedule,
                                 t.activation_checkpointing, t.compile and t.compile_backend, par.sequence_parallel,
                                 init)
    except StructureError as e:
        raise ConfigError(f"model.structure does not fit parallel.tp={par.tp}: {e}") from None
    if init is None:
        return parallel, *full
    return parallel, plain.num_params(counts=init.counts), plain.flops_per_token(cfg.data.seq_len, counts=init.counts)


def deepspeed_optimizer(cfg: Config, model: ParallelModel, local_batch: int, bf16: bool):
    """``parallel.engine: deepspeed``: DeepSpeed's engine around the model, behind the optimizer interface."""
    from parallel.deepspeed import DeepSpeedOptimizer, deepspeed_config

    ds, t, o = cfg.parallel.deepspeed, cfg.train, cfg.optim
    config = deepspeed_config(ds.zero_stage, ds.offload_optimizer, ds.offload_params, t.micro_batch,
                              local_batch // t.micro_batch, o.grad_clip, bf16, cfg.model.d_model)
    return DeepSpeedOptimizer(model, model.param_groups(o.weight_decay), tuple(o.betas), o.eps, config)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; allowed here: auto, cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Progress:
    """The loop's counters: optimizer steps taken and samples consumed (the data position: the sampler is a
    pure function of it, and so is the LR schedule of the step)."""

    def __init__(self):
        self.step, self.consumed_samples = 0, 0

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step), "consumed_samples": torch.tensor(self.consumed_samples)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict["step"])
        self.consumed_samples = int(state_dict["consumed_samples"])


class Trainer:
    """Owns the model, optimizer, data streams, checkpoints and metrics of one run on this rank."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        init_distributed(self.device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.out = Path(cfg.train.out_dir)
        t = cfg.train
        self.corpus = Corpus(cfg.data, samples=(t.steps * t.global_batch, t.eval_batches * t.micro_batch))
        self.loader = Prefetcher(self.corpus.train, t.prefetch)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = self.corpus.vocab_size
        elif cfg.model.vocab_size < self.corpus.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer vocabulary "
                              f"{self.corpus.vocab_size} of the data; set it >= {self.corpus.vocab_size} or null")
        par = cfg.parallel
        self.dims = ParallelDims(par.dp, par.tp, par.pp, par.virtual_stages)
        try:
            self.dims.check_model(cfg.model)
            self.dims.build_mesh(self.device.type)
        except TopologyError as e:
            raise ConfigError(str(e)) from None
        t = cfg.train
        self.local_batch = t.global_batch // par.dp
        self.model, self.full_params, self.flops = build_parallel(cfg, self.dims, self.device, self.local_batch)
        precision = t.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if par.engine == "deepspeed":
            self.optimizer = deepspeed_optimizer(cfg, self.model, self.local_batch, precision == "bf16")
        else:
            self.optimizer = build_optimizer(cfg.optim, self.model.named_parameters(),
                                             self.model.param_groups(cfg.optim.weight_decay), self.model.dp_group,
                                             self.model.tp_group, self.model.pp_group, self.model.placements)
        self.sparsity = None
        if cfg.sparsity.rules:
            self.sparsity = SparsitySchedule(cfg.sparsity.rules, t.steps, self.model.structured_layers(),
                                             self.model.tp_group, self.model.pp_group, self.full_params,
                                             self.flops["forward"], t.global_batch * cfg.data.seq_len, t.seed)
        self.ckpt = Checkpointer(self.out / "checkpoints", cfg.checkpoint.keep)
        self.progress = Progress()
        view = GlobalView(self.dims.submesh("tp"))
        self.state: dict[str, Stateful] = {
            "model": ModelState(self.model.named_tensors(), self.model.placements, view),
            "optim": self._optimizer_state(view),
            "progress": self.progress,
            "rng": RNGState(),
            **({"sparsity": self.sparsity} if self.sparsity is not None else {}),
        }
        """Everything a checkpoint holds, by part; a new kind of training state is one more entry."""
        self._resume()
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())
        self._stop_signal = False

    # -- resume -----------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def consumed(self) -> int:
        return self.progress.consumed_samples

    def record_comm(self) -> CommStats:
        """Count the bytes this rank sends over tp, dp and pp from now on (benchmarks; off by default)."""
        stats = CommStats()
        self.model.record_comm(stats)
        self.optimizer.comm_stats = stats
        return stats

    def _resume(self) -> None:
        """``auto``: the newest intact checkpoint (damaged newer ones are reported and skipped); a path: that
        checkpoint, verified (damage is an error naming the file)."""
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            existing = step_dirs(self.ckpt.root)
            if existing:
                raise CheckpointError(f"train.out_dir={self.out} already holds checkpoints (newest "
                                      f"{existing[-1].name}); pass --resume auto to continue that run, or choose "
                                      "another train.out_dir")
            return
        found = self.ckpt.latest_intact() if mode == "auto" else load_verified(mode)
        if found is None:
            return
        path, meta = found
        check_model_config(meta, to_dict(self.cfg.model), path)
        parts = dict(self.state)
        if self.cfg.checkpoint.load_optimizer:
            self._check_optimizer_checkpoint(meta, path)
        else:
            del parts["optim"]
        if self.sparsity is not None:  # the model as it was when the checkpoint was written
            step = int(meta["step"])  # written before train_step(step): conversions of earlier steps only
            if any(k < step for k in conversion_steps(self.cfg.sparsity.rules, self.cfg.train.steps)):
                self._convert(0, step - 1)
            self._free_guides(self.sparsity.guides_done(step))
            parts.update({k: self.state[k] for k in parts if k in ("model", "optim")})
        with self._whole_parameters():
            self.ckpt.load(path, parts)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step} ({self.consumed:,} samples consumed; written at "
                  f"{meta.get('topology', {})})", file=sys.stderr)

    def _convert(self, first: int, last: int) -> dict[str, float]:
        """``dense_to_structured``: replace the (dense) layers of the rules converting at steps ``first..last`` by
        their structure (``from_dense`` of the full matrix; fresh optimizer state). Collective: every rank calls
        it at a conversion step (and on resuming past one). Returns each projection's relative projection error."""
        layers = self.model.structured_layers()
        due = conversions_due(layers, self.cfg.sparsity.rules, self.cfg.model, self.cfg.train.steps, first, last)
        errors, old, new = {}, [], []
        delta = torch.zeros(3, dtype=torch.float64)
        for name in sorted(due):
            spec = due[name]
            before = layers[name]
            old += [f"{name}.{k}" for k, _ in before.named_parameters()]
            delta -= torch.tensor([before.num_params(), before.flops(1), before.executed_flops(1)],
                                  dtype=torch.float64)
            full = self.model.restructure(name, lambda w, s=spec: structure_class(s.kind).from_dense(
                w, **spec_params(s)))
            after = self.model.structured_layers()[name]
            delta += torch.tensor([after.num_params(), after.flops(1), after.executed_flops(1)],
                                  dtype=torch.float64)
            new += [(f"{name}.{k}", p) for k, p in after.named_parameters()]
            errors[f"sparsity/projection_error/{name}"] = full.projection_error
        self.optimizer.forget(old)
        self.optimizer.adopt(new, "matrix")
        for g in (self.model.tp_group, self.model.pp_group):
            if g is not None:
                dist.all_reduce(delta, group=g)
        params, flops, executed = delta.tolist()
        self.full_params += int(params)
        forward = self.flops["forward"] + int(flops)
        executed = self.flops["executed"] + int(executed)
        self.flops = {**self.flops, "projections": self.flops["projections"] + int(flops), "forward": forward,
                      "train": 3 * forward, "executed": executed, "executed_train": 3 * executed}
        self.sparsity.rebase(self.model.structured_layers(), params, flops)
        self._rebuild_state()
        merged = merge_pp(errors, self.model.pp_group)
        if self.rank == 0 and merged:
            worst = max(merged.values())
            print(f"step {last}: dense_to_structured converted {len(merged)} projections (projection error "
                  f"{min(merged.values()):.3f}-{worst:.3f}); parameters now {self.full_params:,}", file=sys.stderr)
        return merged

    def _rebuild_state(self) -> None:
        """Point the checkpointed model and optimizer parts at the current parameters (after a layer change)."""
        view = GlobalView(self.dims.submesh("tp"))
        self.state["model"] = ModelState(self.model.named_tensors(), self.model.placements, view)
        self.state["optim"] = self._optimizer_state(view)

    def _free_guides(self, names: list[str]) -> None:
        """Drop the self-guided dense paths of ``names`` (their weight reached 0): from the layers, the optimizer
        and the checkpointed state, so later checkpoints no longer hold them."""
        if not names:
            return
        layers = self.model.structured_layers()
        for name in names:
            layers[name].free_guide()
        self.optimizer.forget([f"{name}.guide" for name in names])
        self.model.refresh_parameters()
        self._rebuild_state()

    def _optimizer_state(self, view: GlobalView) -> Stateful:
        if self.cfg.parallel.engine == "deepspeed":
            from parallel.deepspeed import DeepSpeedOptimizerState

            return DeepSpeedOptimizerState(self.optimizer)
        return OptimizerState(self.optimizer, self.model.placements, view)

    def _check_optimizer_checkpoint(self, meta: dict, path: Path) -> None:
        """Refuse optimizer state that cannot load into this run, before any collective starts."""
        saved = meta["config"]["optim"]["name"]
        if saved != self.cfg.optim.name:
            raise CheckpointError(f"{path} holds {saved} optimizer state but optim.name={self.cfg.optim.name}; "
                                  f"set optim.name={saved}, or checkpoint.load_optimizer=false to start a fresh "
                                  "optimizer from the checkpoint's weights")
        saved_engine = meta["config"].get("parallel", {}).get("engine", "native")
        engine = self.cfg.parallel.engine
        topology = meta.get("topology", {})
        if saved_engine != engine or (engine == "deepspeed" and (topology.get("dp"), topology.get("tp")) !=
                                      (self.dims.dp, self.dims.tp)):
            raise CheckpointError(f"{path} holds {saved_engine}-engine optimizer state written at "
                                  f"dp={topology.get('dp')} tp={topology.get('tp')}; this run is "
                                  f"parallel.engine={engine} at dp={self.dims.dp} tp={self.dims.tp}. "
                                  "DeepSpeed's ZeRO partitions resume at their own engine and "
                                  "topology only: resume there, or set checkpoint.load_optimizer=false (the weights "
                                  "load at any topology and engine)")
        tp = topology.get("tp", 1)
        if tp != self.dims.tp and not self.optimizer.tp_reshardable:
            raise CheckpointError(f"{path} was written at parallel.tp={tp}; {saved} keeps per-shard state that "
                                  f"does not reshard to parallel.tp={self.dims.tp}. Resume at parallel.tp={tp} "
                                  "(dp and pp may change), or set checkpoint.load_optimizer=false")

    # -- pieces of the loop ---------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``global_batch`` sequences; returns (global mean loss, grad norm)."""
        self.sparse_update = {}
        if self.sparsity is not None:
            if self.step in conversion_steps(self.cfg.sparsity.rules, self.cfg.train.steps):
                self.sparse_update.update(self._convert(self.step, self.step))
            self.sparse_update.update(self.sparsity.update(self.step))
            self._free_guides(self.sparsity.guides_done(self.step))
        start = self.progress.consumed_samples + self.model.dp_rank * self.local_batch
        ahead = start + self.cfg.train.global_batch if self.progress.step + 1 < self.cfg.train.steps else None
        x, y = self.loader.batch(start, self.local_batch, ahead)
        if self.cfg.parallel.engine == "deepspeed":  # ZeRO's reduce, clip and step
            local, norm = self.optimizer.train_batch(x, y, self.autocast)
        else:
            local = self.model.forward_backward(x, y, self.autocast)
            for layer in self.model.structured_layers().values():  # once per step, after the last micro-batch
                layer.regularize_grad()
            norm = self.model.reduce_and_clip(self.cfg.optim.grad_clip, self.optimizer.owners)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.progress.consumed_samples += self.cfg.train.global_batch
        self.progress.step += 1
        if self.sparsity is not None:
            self.sparsity.account_step()
        return self.model.global_mean(local), norm

    def evaluate(self) -> float:
        """Mean loss over the first ``eval_batches * micro_batch`` validation samples (split over dp)."""
        t = self.cfg.train
        share = t.eval_batches * t.micro_batch // self.dims.dp
        x, y = self.corpus.val.batch(self.model.dp_rank * share, share)
        return self.model.global_mean(self.model.eval_loss(x, y, self.autocast))

    def save(self) -> Path:
        topology = {"dp": self.dims.dp, "tp": self.dims.tp, "pp": self.dims.pp}
        meta = {"consumed_samples": self.consumed, "config": to_dict(self.cfg), "topology": topology}
        files = {"config.yaml": dump_config(self.cfg), **tokenizer_files(self.corpus)}
        with self._whole_parameters():
            return self.ckpt.save(self.step, self.state, meta, files)

    def _whole_parameters(self):
        """Every parameter whole on every rank while a checkpoint reads or writes the model (ZeRO-3 shards them)."""
        gathered = getattr(self.optimizer, "gathered", None)
        return gathered() if gathered is not None else contextlib.nullcontext()

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = True

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``train.steps`` (or ``exit_after_steps`` / SIGTERM); returns the last metrics."""
        cfg, t = self.cfg, self.cfg.train
        main = self.rank == 0
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(cfg))
        flops, params = self.flops, self.full_params
        peak = peak_tflops(self.device, cfg.log.peak_tflops) if main else None
        metrics = Metrics(self.out, t.steps, self.step, cfg.log.progress, cfg.log.tensorboard, enabled=main)
        world = dist.get_world_size() if dist.is_initialized() else 1
        metrics.write(f"model: {params:,} parameters, {flops['forward']:,} forward FLOPs/token "
                      f"({flops['executed']:,} executed); "
                      f"data: {self.corpus.describe()}; {world} process(es) as dp={self.dims.dp} tp={self.dims.tp} "
                      f"pp={self.dims.pp} on {self.device}")
        if self.sparsity is not None:
            metrics.write(f"sparsity: {describe(cfg.sparsity.rules, t.steps)}")
        own = self.optimizer.ownership()
        metrics.write(f"optimizer: {cfg.optim.name}, {self.optimizer.state_bytes():,} state bytes on rank 0; "
                      f"blocks owned over dp={self.dims.dp} with imbalance {own['imbalance']:.3f} (max/mean)")
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        last: dict = {}
        try:
            if self.step == 0:
                last["val/loss"] = self.evaluate()
                metrics.log(0, {"val/loss": last["val/loss"], "model/params": params,
                                "model/flops_per_token": flops["forward"],
                                "optim/state_bytes_rank0": self.optimizer.state_bytes()})
            ran = 0
            tokens_per_step = t.global_batch * cfg.data.seq_len
            while self.step < t.steps:
                lr = lr_at(self.step, t.steps, cfg.optim)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                start = time.perf_counter()
                loss, grad_norm = self.train_step()
                elapsed = time.perf_counter() - start
                ran += 1
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {self.step}; lower optim.lr or raise "
                                             "optim.warmup_steps (no checkpoint written for this step)")
                tok_s = tokens_per_step / elapsed
                tflops = self.flops["train"] * tok_s / 1e12
                last = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                        "perf/tokens_per_s": tok_s, "perf/tflops": tflops,
                        # how much faster this rank's loader draws a batch than the step consumes it (want > 10)
                        "perf/loader_ratio": elapsed / max(self.loader.load_s, 1e-9),
                        "perf/data_wait_s": self.loader.wait_s}
                if peak:  # on the structure's FLOPs, and on what the products execute (zeros included)
                    last["perf/mfu"] = tflops / (peak * world)
                    last["perf/mfu_executed"] = self.flops["executed_train"] * tok_s / 1e12 / (peak * world)
                if self.sparsity is not None:
                    last.update({**self.sparsity.metrics(), **self.sparse_update})
                if self.device.type == "cuda":
                    last["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.step % t.eval_interval == 0 or self.step == t.steps:
                    last["val/loss"] = self.evaluate()
                    metrics.write(f"step {self.step}: val loss {last['val/loss']:.4f}")
                if (self.step % cfg.log.interval == 0 or "val/loss" in last or self.step == t.steps
                        or self.sparse_update):
                    metrics.log(self.step, last)
                metrics.advance(self.step, {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"})
                interval = cfg.checkpoint.interval
                stopping = self._should_stop(ran)
                if self.step == t.steps or stopping or (interval and self.step % interval == 0):
                    path = self.save()
                    metrics.write(f"saved {path}")
                if stopping:
                    metrics.write(f"stopping at step {self.step} of {t.steps}; continue with --resume auto")
                    break
        finally:
            signal.signal(signal.SIGTERM, previous)
            metrics.close()
        return {"step": self.step, **last}

    def _should_stop(self, ran: int) -> bool:
        """Exit-after-steps or SIGTERM on any rank; agreed by all ranks so they checkpoint together."""
        limit = self.cfg.train.exit_after_steps
        stop = self._stop_signal or (limit is not None and ran >= limit)
        if dist.is_initialized():
            flag = torch.tensor([int(stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML recipe (default: built-in tiny-cpu defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override one config field (repeatable); the value is parsed as YAML")
    ap.add_argument("--resume", help="none | auto | path of a step directory (overrides checkpoint.resume)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg)
    except UserError as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    result = trainer.fit()
    if trainer.rank == 0:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if k in ("train/loss", "val/loss"))
        print(f"done at step {result['step']}: {summary}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
