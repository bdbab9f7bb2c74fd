"""The typed config tree: YAML file, then ``--set a.b=c`` overrides, then validation.

Every section is a dataclass with a docstring per field. Unknown keys, wrong types and values outside
their allowed set stop the run before any work with a message that names the dotted field.
"""

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import PROJECTIONS, STRUCTURE_KEYS, ModelConfig, StructureSpec, key_covers
from model.structured import REGISTRY, StructureError, spec_params, structure_class


class UserError(Exception):
    """A mistake in the user's input (config, data path, checkpoint): reported without a traceback."""


class ConfigError(UserError):
    """An invalid config value; the message names the dotted field and what is allowed."""


@dataclass
class DataConfig:
    """Token stores and how windows are drawn from them."""

    paths: list[str] = field(default_factory=lambda: ["data/stdlib"])
    """Token stores: zarr directories written by ``tools/prepare_data.py``, or Megatron corpora given by the prefix
    of their ``.bin/.idx`` files (read with megatron-core's ``IndexedDataset``)."""
    weights: list[float] | None = None
    """Blend weights, one per path (normalised); None weighs stores equally."""
    seq_len: int = 128
    """Tokens per training sequence."""
    val_fraction: float = 0.05
    """Fraction of each store's documents (the tail, cut at a document boundary) held out for validation."""
    seed: int = 1234
    """Seed of the window permutation (one permutation per epoch)."""
    tokenizer: str | None = None
    """The run's tokenizer (a ``.model``/``.json`` file or a directory holding one). Needed by a Megatron corpus
    without a ``PREFIX.tokenizer/`` beside it; when set, every store that records a tokenizer must use this one."""
    sampler: Literal["native", "megatron"] = "native"
    """native: seeded non-overlapping windows, blended by weight (resumable at any sample); megatron: Megatron-LM's
    ``GPTDataset`` / ``BlendedMegatronDatasetBuilder`` sample order (megatron-core), for runs moved from Megatron."""


@dataclass
class GaloreConfig:
    """GaLore: Adam in a rank-r subspace of each matrix block's gradient (``optim.name: galore``)."""

    rank: int = 16
    """Subspace rank r; blocks whose smaller side is below r use AdamW (at r equal to it GaLore is lossless)."""
    update_gap: int = 200
    """Refresh the projector every this many steps."""
    scale: float = 0.25
    """Multiplier of the projected-back update."""
    projection: Literal["svd", "dct"] = "svd"
    """svd: top-r singular vectors of the gradient; dct: SVD-free, the r DCT basis columns best aligned with it."""
    embeddings: bool = False
    """Also project the token embedding and output head (else AdamW, like norms)."""


@dataclass
class SGDConfig:
    """SGD with momentum (``optim.name: sgd``); torch.optim.SGD's defaults apart from the momentum."""

    momentum: float = 0.9
    """Momentum coefficient (0: plain SGD)."""
    dampening: float = 0.0
    """Dampening of the gradient in the momentum buffer."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0 and dampening 0)."""


@dataclass
class MLBFGSConfig:
    """Momentum L-BFGS (``optim.name: mlbfgs``; Niu et al., TMLR 2023). Defaults: the reference's published run
    (yuehniu/mL-BFGS run-SLIM.sh), with a transformer layer as the block."""

    history: int = 10
    """Curvature pairs (s, y) kept per block."""
    update_period: int = 50
    """T: a pair is formed every T steps from the momentum averages (the first at step 2T; momentum SGD before)."""
    beta: float = 0.999
    """Momentum of the parameter and gradient averages the pairs are differences of."""
    pair_momentum: float = 0.9
    """Each new pair is mixed with the previous one: s <- (1 - m) s + m s_prev (likewise y)."""
    damping: float = 0.01
    """Least share of the identity blended into y (tau0 = 1 - damping)."""
    min_curvature: float = 0.01
    """Damping's lower bound on s.y / s.s (below 1)."""
    max_curvature: float = 1.5
    """Damping's upper bound on s.y / s.s (above 1)."""
    momentum: float = 0.9
    """SGD momentum applied to the normalised quasi-Newton direction (and to the gradient during warm-up)."""
    granularity: Literal["tensor", "layer", "stage"] = "layer"
    """Hessian block: one tensor, one transformer layer (embedding, final norm and head alone), or a pipeline
    stage (what one pp rank holds: changes with parallel.pp)."""
    normalize: bool = True
    """Divide the quasi-Newton direction by its global norm (the reference does; false keeps H g's length, lr ~1)."""
    history_dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage of the (s, y) history; bfloat16 halves its bytes (the recursion computes in float32)."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (the same LR schedule, weight decay and clipping for every
    optimizer; all three are block-wise distributed over the data-parallel group)."""

    name: Literal["adamw", "galore", "mlbfgs", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """LR shape after warmup: cosine decay, warmup-stable-decay, or constant."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """wsd: fraction of training spent in the final linear decay."""
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    """GaLore settings (used when name is galore)."""
    mlbfgs: MLBFGSConfig = field(default_factory=MLBFGSConfig)
    """mL-BFGS settings (used when name is mlbfgs)."""
    sgd: SGDConfig = field(default_factory=SGDConfig)
    """SGD settings (used when name is sgd)."""


@dataclass
class TrainConfig:
    """The loop."""

    steps: int = 300
    """Optimizer steps of the whole run (the schedule's horizon)."""
    global_batch: int = 16
    """Sequences per optimizer step."""
    micro_batch: int = 16
    """Sequences per forward pass; ``global_batch / micro_batch`` gradient-accumulation steps."""
    eval_interval: int = 50
    """Validate every this many steps (and at the end)."""
    eval_batches: int = 4
    """Micro-batches of validation data per evaluation."""
    exit_after_steps: int | None = None
    """Stop this process after this many steps (checkpointing first), e.g. to fit a job time limit;
    the schedule still targets ``steps`` and ``--resume auto`` continues."""
    seed: int = 0
    """Seed of the model initialisation."""
    prefetch: bool = True
    """Draw the next step's batch in a background thread while this step runs (the samples are the same)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in the backward, per block: ``full`` keeps only each block's input, ``selective``
    keeps the outputs of the matrix products and attention and recomputes the norms, activations and
    elementwise steps. Losses are exactly those of ``none``."""
    compile: bool = False
    """``torch.compile`` each block (the Triton kernels are custom ops inside its graphs)."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """``torch.compile``'s backend: ``inductor`` (generated kernels), ``aot_eager`` (the same graph capture and
    autograd, eager kernels: for debugging a graph, and what the multi-process tests use to stay fast)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto picks CUDA when present."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision: auto is bf16 on CUDA, fp32 on CPU."""
    out_dir: str = "runs/tiny-cpu"
    """Run directory: checkpoints/, tb/ (TensorBoard), metrics.jsonl, config.yaml."""


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine's memory settings (``parallel.engine: deepspeed``; AdamW, pp = 1)."""

    zero_stage: Literal[1, 2, 3] = 2
    """ZeRO stage over the data-parallel group: 1 shards the optimizer state, 2 also the gradients, 3 also the
    parameters."""
    offload_optimizer: bool = False
    """Keep the optimizer state (and its step) on CPU."""
    offload_params: bool = False
    """Keep the parameters on CPU between uses (ZeRO-3 only)."""


@dataclass
class ParallelConfig:
    """Topology: data x tensor x pipeline parallel degrees. Their product must equal the world size."""

    dp: int = 1
    """Data-parallel replicas (the global batch is split between them)."""
    tp: int = 1
    """Tensor-parallel ranks: heads, projections (each structure's own shard), vocabulary."""
    pp: int = 1
    """Pipeline stages (contiguous blocks; first stage has the embedding, last the norm, head and loss)."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    """torch.distributed.pipelining schedule; interleaved_1f1b and zero_bubble use ``virtual_stages``."""
    virtual_stages: int = 1
    """Stages per pipeline rank (interleaved schedules); n_layers must divide by pp * virtual_stages."""
    engine: Literal["native", "deepspeed"] = "native"
    """``native``: torch.distributed (block-wise ZeRO-1 optimizers, any dp x tp x pp). ``deepspeed``: DeepSpeed's
    ZeRO-1/2/3 and CPU offload over the dp group for AdamW, with our tensor parallelism (pp = 1)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Settings of ``engine: deepspeed``."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism: the norms and the residual stream between tensor-parallel regions are
    split along the sequence over the tp group (all-gather / reduce-scatter at the borders instead of the
    all-reduce); needs data.seq_len divisible by tp. No effect at tp = 1."""


@dataclass
class CheckpointConfig:
    """Sharded checkpoints with torch.distributed.checkpoint."""

    interval: int = 100
    """Save every this many steps (and at the end); 0 saves only at the end."""
    keep: int = 2
    """Keep the newest this many step directories; 0 keeps all."""
    resume: str = "none"
    """``none`` (refuses a run directory that already has checkpoints), ``auto`` (newest, if any), or a
    step directory path."""
    load_optimizer: bool = True
    """Restore the optimizer state on resume; false starts a fresh optimizer (e.g. to switch optim.name,
    or to change parallel.tp under galore, whose per-shard projections do not reshard over tp)."""


@dataclass
class LogConfig:
    """Metrics and progress."""

    interval: int = 10
    """Write scalars every this many steps."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``out_dir/tb``."""
    peak_tflops: float | None = None
    """Peak TFLOP/s for MFU; None: known GPU table on CUDA, measured fp32 matmul throughput on CPU."""


@dataclass
class SparsityRule:
    """One sparse-pretraining rule: which projections, and how their sparsity evolves over training."""

    select: str = "default"
    """Projections it applies to: the keys of ``model.structure`` (``default``, ``attn``, ``mlp``, ``q`` ...
    ``down``)."""
    method: Literal["gmp", "nm", "self_guided", "dense_to_structured", "block_size_search"] = "gmp"
    """``gmp``: gradual magnitude pruning (Zhu and Gupta, 2017) on the cubic schedule. ``nm``: the schedule of
    ``nm`` projections (their spec's ``n:m`` is the final pattern): dense warm-up, then SR-STE and optional
    progressive gradient flow (MDGF ``mask_decay``, SDGF ``structure_decay``), then a fixed mask.
    ``self_guided``: a dense guide mixed into a structured projection, decaying from 1 at ``start`` to 0 at
    ``end`` (then freed). ``dense_to_structured``: the projections train dense until ``start``, are then
    replaced by their ``model.structure`` through ``from_dense`` (optimizer state restarted) and continue.
    ``block_size_search``: dense projections scored for each of ``block_sizes`` on the live weights before
    ``start``; at ``start`` the chosen block size is fixed and ``gmp`` prunes blocks of it to ``target``."""
    target: float = 0.5
    """``gmp``: final density (kept fraction of the pruned units), in (0, 1]."""
    start: float | None = None
    """Fraction of ``train.steps`` where pruning starts (dense until then); default 0.25 for ``gmp``, 0.0 for
    ``nm`` (its dense warm-up) and ``self_guided`` (the guide's weight starts to decay); for
    ``dense_to_structured`` the conversion step (default 0.5)."""
    end: float | None = None
    """Fraction of ``train.steps`` where ``gmp`` reaches ``target``; for ``nm`` where the mask is frozen (the
    final fixed-mask fraction is ``1 - end``); for ``self_guided`` where the guide's weight reaches 0 and the
    guide is freed. Default 0.75 for ``gmp``, 1.0 for ``nm``, 0.5 for ``self_guided``."""
    mask_decay: Literal["none", "linear", "exp"] = "none"
    """``nm``: MDGF: pruned weights are applied times ``a(t)``, ``max(0, 1 - coef * (t - t0))`` (linear) or
    ``exp(-coef * (t - t0))`` (exp) from the first sparse step ``t0``; ``none``: ``a = 0``."""
    decay_coef: float | None = None
    """``nm``: the per-step coefficient of ``mask_decay``; default: ``1 / (t1 - t0)`` for linear (``a`` reaches 0
    at ``end``), ``5 / (t1 - t0)`` for exp."""
    guide_decay: Literal["cosine", "linear"] = "cosine"
    """``self_guided``: the guide's weight ``a`` from 1 to 0 over [start, end]: ``(1 + cos(pi r)) / 2`` or
    ``1 - r``, ``r`` the elapsed fraction of the window."""
    stochastic: bool = False
    """``self_guided``: the reduced-FLOP mode: each step the guide runs with probability ``a`` (mixed in as
    above), otherwise the structured path alone."""
    block_sizes: list[int] = field(default_factory=lambda: [8, 16, 32])
    """``block_size_search``: the candidate block sides (each a multiple of the smallest)."""
    tolerance: float = 0.05
    """``block_size_search``: the largest candidate whose blocks kept at ``target`` retain at least ``1 -
    tolerance`` of the energy the smallest candidate's retain wins."""
    structure_decay: bool = False
    """``nm``: SDGF: the pattern decays from ``(m-1):m`` through ``m/2^i:m`` in equal frames over
    [start, end) and is ``n:m`` from ``end`` (so ``end`` < 1)."""
    interval: int = 10
    """Steps between mask updates inside [start, end]."""
    granularity: Literal["element", "block", "nm"] = "element"
    """Prune single weights, square blocks of ``block_size`` (blocksparse: its own blocks), or ``nm``: within
    every group of ``m`` consecutive inputs keep ``round(d(t) m)`` weights, ending at ``target * m`` : ``m``
    (dense projections)."""
    block_size: int | None = None
    """Side of the blocks for ``granularity: block`` (dense); blocksparse uses its own."""
    m: int | None = None
    """Group size of ``granularity: nm`` (``target * m`` must be a whole number: the final n)."""
    scope: Literal["projection", "global"] = "projection"
    """One magnitude threshold per projection, or one across every projection this rule selects."""


@dataclass
class SparsityConfig:
    """Sparse pretraining: rules applied to the structured projections (empty: none)."""

    rules: list[SparsityRule] = field(default_factory=list)
    """Each projection may be selected by at most one rule."""


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)

    def validate(self) -> None:
        """Cross-field checks; raises ``ConfigError`` naming the fields."""
        t, d, o = self.train, self.data, self.optim
        positive = {"train.steps": t.steps, "train.global_batch": t.global_batch,
                    "train.micro_batch": t.micro_batch, "train.eval_interval": t.eval_interval,
                    "train.eval_batches": t.eval_batches, "data.seq_len": d.seq_len, "log.interval": self.log.interval}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name}={value} must be a positive integer")
        par = self.parallel
        for name in ("dp", "tp", "pp", "virtual_stages"):
            if getattr(par, name) <= 0:
                raise ConfigError(f"parallel.{name}={getattr(par, name)} must be a positive integer")
        if t.global_batch % (t.micro_batch * par.dp):
            raise ConfigError(f"train.global_batch={t.global_batch} must be divisible by train.micro_batch="
                              f"{t.micro_batch} x parallel.dp={par.dp} (micro_batch is per data-parallel rank)")
        if (t.eval_batches * t.micro_batch) % par.dp:
            raise ConfigError(f"train.eval_batches x train.micro_batch = {t.eval_batches * t.micro_batch} "
                              f"validation samples must split evenly over parallel.dp={par.dp}")
        if par.virtual_stages > 1 and par.pp_schedule not in ("interleaved_1f1b", "zero_bubble"):
            raise ConfigError(f"parallel.virtual_stages={par.virtual_stages} needs parallel.pp_schedule "
                              f"interleaved_1f1b or zero_bubble, not {par.pp_schedule!r}")
        if d.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if par.engine == "deepspeed":
            native = "use parallel.engine=native"
            if par.pp > 1:
                raise ConfigError(f"parallel.engine=deepspeed runs with parallel.pp=1 (pipeline parallelism is the "
                                  f"native engine's); got parallel.pp={par.pp}: {native}")
            if self.optim.name != "adamw":
                raise ConfigError(f"parallel.engine=deepspeed takes optim.name=adamw; {self.optim.name} updates whole "
                                  f"matrices, which ZeRO flattens and shards: {native}")
            if self.sparsity.rules:
                raise ConfigError(f"parallel.engine=deepspeed does not run sparsity.rules (masks and schedules need "
                                  f"whole gradients after accumulation): {native}")
            if par.deepspeed.offload_params and par.deepspeed.zero_stage != 3:
                raise ConfigError(f"parallel.deepspeed.offload_params=true needs parallel.deepspeed.zero_stage=3, "
                                  f"not {par.deepspeed.zero_stage}")
        if par.sequence_parallel and d.seq_len % par.tp:
            raise ConfigError(f"parallel.sequence_parallel=true splits data.seq_len={d.seq_len} over "
                              f"parallel.tp={par.tp} ranks; set data.seq_len to a multiple of {par.tp}")
        if not 0.0 < d.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={d.val_fraction} must lie in (0, 1)")
        if not d.paths:
            raise ConfigError("data.paths is empty; give at least one token store")
        if d.weights is not None and (len(d.weights) != len(d.paths) or min(d.weights) < 0 or sum(d.weights) <= 0):
            raise ConfigError(f"data.weights={d.weights} needs one non-negative weight per data.paths entry "
                              f"({len(d.paths)}), not all zero")
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1)")
        for name in ("lr", "eps"):
            if getattr(o, name) <= 0:
                raise ConfigError(f"optim.{name}={getattr(o, name)} must be > 0")
        for name in ("min_lr_ratio", "decay_fraction"):
            if not 0.0 <= getattr(o, name) <= 1.0:
                raise ConfigError(f"optim.{name}={getattr(o, name)} must lie in [0, 1]")
        if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")
        ga, mb = o.galore, o.mlbfgs
        for name, value in {"optim.galore.rank": ga.rank, "optim.galore.update_gap": ga.update_gap,
                            "optim.mlbfgs.history": mb.history, "optim.mlbfgs.update_period": mb.update_period}.items():
            if value <= 0:
                raise ConfigError(f"{name}={value} must be a positive integer")
        if ga.scale <= 0:
            raise ConfigError(f"optim.galore.scale={ga.scale} must be > 0")
        for name in ("momentum", "beta", "pair_momentum", "damping"):
            if not 0.0 <= getattr(mb, name) < 1.0:
                raise ConfigError(f"optim.mlbfgs.{name}={getattr(mb, name)} must lie in [0, 1)")
        if not 0.0 < mb.min_curvature < 1.0 < mb.max_curvature:
            raise ConfigError(f"optim.mlbfgs.min_curvature={mb.min_curvature} and max_curvature={mb.max_curvature}: "
                              "need 0 < min_curvature < 1 < max_curvature (damping blends towards curvature 1)")
        sg = o.sgd
        if not 0.0 <= sg.momentum < 1.0 or not 0.0 <= sg.dampening <= 1.0:
            raise ConfigError(f"optim.sgd needs 0 <= momentum < 1 and 0 <= dampening <= 1; got {sg.momentum}, "
                              f"{sg.dampening}")
        if sg.nesterov and (sg.momentum == 0 or sg.dampening != 0):
            raise ConfigError(f"optim.sgd.nesterov needs momentum > 0 and dampening 0; got {sg.momentum}, "
                              f"{sg.dampening}")
        if self.checkpoint.interval < 0 or self.checkpoint.keep < 0:
            raise ConfigError("checkpoint.interval and checkpoint.keep must be >= 0")
        if t.exit_after_steps is not None and t.exit_after_steps <= 0:
            raise ConfigError(f"train.exit_after_steps={t.exit_after_steps} must be a positive integer or null")
        try:
            self.model.validate(require_vocab=False)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for key, spec in self.model.structure.items():
            try:
                spec_params(spec)
            except StructureError as e:
                raise ConfigError(f"model.structure.{key}: {e}") from None
        self._validate_sparsity()

    def _validate_sparsity(self) -> None:
        owner: dict[str, int] = {}
        for i, rule in enumerate(self.sparsity.rules):
            at = f"sparsity.rules[{i}]"
            if rule.select not in STRUCTURE_KEYS:
                raise ConfigError(f"{at}.select={rule.select!r}; allowed: {sorted(STRUCTURE_KEYS)}")
            if rule.method not in METHOD_WINDOWS:
                raise ConfigError(f"{at}.method={rule.method!r}; allowed: {sorted(METHOD_WINDOWS)}")
            start, end = METHOD_WINDOWS[rule.method]
            rule.start = start if rule.start is None else rule.start
            rule.end = end if rule.end is None else rule.end
            if not 0.0 < rule.target <= 1.0:
                raise ConfigError(f"{at}.target={rule.target} must lie in (0, 1]")
            if not 0.0 <= rule.start < rule.end <= 1.0:
                raise ConfigError(f"{at}: start={rule.start} and end={rule.end} need 0 <= start < end <= 1 "
                                  "(fractions of train.steps)")
            if rule.interval <= 0:
                raise ConfigError(f"{at}.interval={rule.interval} must be a positive integer")
            if rule.granularity != "block" and rule.block_size is not None:
                raise ConfigError(f"{at}.block_size applies to granularity block only")
            if (rule.granularity == "nm") != (rule.m is not None):
                raise ConfigError(f"{at}: granularity nm needs m (the group size), and m belongs to it only")
            if rule.granularity == "nm":
                n = rule.target * rule.m
                if rule.m <= 0 or abs(n - round(n)) > 1e-9 or round(n) < 1:
                    raise ConfigError(f"{at}: granularity nm keeps target * m = {rule.target} * {rule.m} weights per "
                                      "group at the end; choose m > 0 with target * m a whole number >= 1")
                if rule.scope != "projection":
                    raise ConfigError(f"{at}.scope={rule.scope}: granularity nm selects within each group; scope "
                                      "projection only")
            if rule.block_size is not None and rule.block_size <= 0:
                raise ConfigError(f"{at}.block_size={rule.block_size} must be a positive integer")
            if rule.decay_coef is not None and not rule.decay_coef > 0:
                raise ConfigError(f"{at}.decay_coef={rule.decay_coef} must be positive")
            if rule.method != "nm" and (rule.mask_decay != "none" or rule.structure_decay):
                raise ConfigError(f"{at}: mask_decay and structure_decay belong to method nm, not {rule.method}")
            if rule.method == "block_size_search":
                sizes = rule.block_sizes
                if not sizes or any(not isinstance(b, int) or b <= 0 or b % min(sizes) for b in sizes):
                    raise ConfigError(f"{at}.block_sizes={sizes}: positive integers, each a multiple of the smallest")
                rule.block_sizes = sorted(sizes)
                if not 0.0 <= rule.tolerance < 1.0:
                    raise ConfigError(f"{at}.tolerance={rule.tolerance} must lie in [0, 1)")
                if rule.start == 0.0:
                    raise ConfigError(f"{at}.start=0.0 leaves no search window; the search scores the weights "
                                      "before start")
            if rule.method != "self_guided" and rule.stochastic:
                raise ConfigError(f"{at}.stochastic belongs to method self_guided, not {rule.method}")
            if rule.structure_decay and rule.end >= 1.0:
                raise ConfigError(f"{at}.structure_decay reaches the final n:m at end={rule.end}; set end < 1 "
                                  "(the fraction after it trains the fixed n:m mask)")
            for proj in PROJECTIONS:
                if key_covers(rule.select, proj):
                    if proj in owner:
                        raise ConfigError(f"{at}.select={rule.select!r} selects the {proj} projections, already "
                                          f"selected by sparsity.rules[{owner[proj]}]")
                    owner[proj] = i
                    self._check_rule_applies(at, rule, proj)

    def _check_rule_applies(self, at: str, rule: SparsityRule, proj: str) -> None:
        spec = self.model.spec_for(proj)
        if rule.method in METHOD_KINDS:
            accepts, what = METHOD_KINDS[rule.method]
            if not accepts(spec.kind):
                raise ConfigError(f"{at}: method {rule.method} {what}; the {proj} projections are {spec.kind}")
        if rule.method == "block_size_search":
            dims = self.model.projection_shape(proj)
            for bs in rule.block_sizes:
                if any(d % bs for d in dims):
                    raise ConfigError(f"{at}.block_sizes: {bs} does not divide the {proj} projections "
                                      f"({dims[1]} -> {dims[0]})")
        if rule.method != "gmp":
            return
        cls = structure_class(spec.kind)
        if rule.granularity not in cls.prune_granularities:
            allowed = [k for k, c in REGISTRY.items() if rule.granularity in c.prune_granularities]
            raise ConfigError(f"{at}: method {rule.method} at granularity {rule.granularity} does not "
                              f"apply to the {spec.kind} {proj} projections; it prunes {allowed}")
        if rule.granularity == "block" and rule.block_size is None and spec.kind == "dense":
            raise ConfigError(f"{at}.block_size is required for granularity block on dense projections")
        if rule.granularity == "nm" and self.model.projection_shape(proj)[1] % rule.m:
            raise ConfigError(f"{at}.m={rule.m} does not divide the {proj} projections' "
                              f"{self.model.projection_shape(proj)[1]} inputs")


METHOD_KINDS = {
    "nm": (lambda kind: kind == "nm", "schedules nm projections"),
    "self_guided": (lambda kind: kind != "dense", "guides structured projections with a dense path"),
    "dense_to_structured": (lambda kind: kind != "dense", "converts dense projections to their model.structure"),
    "block_size_search": (lambda kind: kind == "dense", "prunes dense projections by blocks"),
}
"""The structures each method other than gmp applies to (gmp: those with ``prune_granularities``)."""
METHOD_WINDOWS = {"gmp": (0.25, 0.75), "nm": (0.0, 1.0), "self_guided": (0.0, 0.5), "dense_to_structured": (0.5, 1.0),
                  "block_size_search": (0.25, 0.75)}
"""Default ``(start, end)`` of each sparsity method."""


# -- generic dataclass <-> dict -----------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}: null is not allowed; expected {_type_name(tp)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}={value!r} is not allowed; allowed: {list(allowed)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r} must be a list")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r} must be a mapping")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        return value
    raise TypeError(f"{path}: unsupported config type {tp}")


def from_dict(cls, data: Any, path: str = ""):
    """Build dataclass ``cls`` from a (YAML) mapping, checking keys and types; errors name the dotted path."""
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{path + '.' if path else ''}{key}: unknown key; allowed: {names}")
    kwargs = {k: _convert(v, hints[k], f"{path + '.' if path else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (for YAML dumps and comparisons)."""
    return dataclasses.asdict(cfg)


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to a raw config dict; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key segment")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _merge(base: dict, over: dict) -> dict:
    """Deep merge; a structure spec (a mapping with ``kind``) is replaced whole, so a recipe that switches a
    projection's kind never inherits the base's fields of another kind."""
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and "kind" not in value
        out[key] = _merge(out[key], value) if nested else value
    return out


def _read_recipe(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML recipe; a top-level ``base: other.yaml`` (relative to the file) is read first and deep-merged
    under it, so recipes state only what they change."""
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file" + (f" (the base of {seen[-1]})" if seen else ""))
    if p.resolve() in seen:
        raise ConfigError(f"--config {p}: base recipes form a cycle")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {p}: expected a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(_read_recipe(p.parent / str(base), (*seen, p.resolve())), raw)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe, apply dotted overrides, and validate."""
    raw = _read_recipe(Path(path)) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = from_dict(Config, raw)
    cfg.validate()
    return cfg


RETIRED = {("optim", "mlbfgs", "trust"): "the trust-region mL-BFGS variant, replaced by the paper's in issue 12"}
"""Settings older checkpoints may record that no longer exist, and why (dropped when a checkpoint's config is read)."""


def checkpoint_config(raw: dict) -> Config:
    """The config a checkpoint recorded, without the ``RETIRED`` settings an older version wrote."""
    raw = copy.deepcopy(raw)
    for path in RETIRED:
        node = raw
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return from_dict(Config, raw)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (loadable by ``load_config``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "LogConfig", "ModelConfig", "OptimConfig",
           "ParallelConfig", "SGDConfig", "SparsityConfig", "SparsityRule",
           "StructureSpec", "TrainConfig", "UserError", "apply_override", "dump_config", "from_dict", "load_config",
           "to_dict"]
