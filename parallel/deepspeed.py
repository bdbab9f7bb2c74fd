"""DeepSpeed as the memory engine (``parallel.engine: deepspeed``): ZeRO-1/2/3 and CPU offload over the
data-parallel group for AdamW, composed with our tensor parallelism through DeepSpeed's model-parallel interface.

torch.distributed stays the main engine: the mesh, tensor parallelism (every structure's own shard), the data
order, the LR schedule and the checkpoints are ours. DeepSpeed gets the (tensor-parallel) model of one stage, a
``torch.optim.AdamW`` over our parameter groups, and ``MeshMPU``, which tells it that its data-parallel group is
the mesh's dp group and its model-parallel group the tp group. It then shards the optimizer state (ZeRO-1), the
gradients (2) and the parameters (3) over dp, reduces gradients over dp and clips by the global norm over dp and
tp (a tensor-parallel shard is marked ``tensor_model_parallel``; a replicated tensor counts once).

Gradients of replicated parameters that are partial sums over tp (``ParallelModel.partial``) are all-reduced
over tp (``GroupComm.all_reduce_``) by a tensor hook, before DeepSpeed's own reduction sees them.
"""

import torch
import torch.distributed as dist

from parallel.mesh import ParallelDims
from parallel.runtime import ParallelModel


class MeshMPU:
    """DeepSpeed's ``mpu`` (Megatron's parallel-state interface) over our mesh: model parallel = tp."""

    def __init__(self, dims: ParallelDims):
        mesh = dims.mesh
        self._dp = mesh.get_group("dp") if mesh is not None else dist.group.WORLD
        self._tp = mesh.get_group("tp") if mesh is not None else dist.group.WORLD

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_model_parallel_group(self):
        return self._tp

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self._tp)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._tp)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


def deepspeed_config(zero_stage: int, offload_optimizer: bool, offload_params: bool, micro_batch: int,
                     accumulation: int, grad_clip: float, bf16: bool, d_model: int) -> dict:
    """The DeepSpeed config of one run: batch sizes per dp rank, clipping, ZeRO stage and offload.

    Communication buckets scale with the model as the Hugging Face integration's ``auto`` values do
    (``d_model^2`` elements per reduce bucket, 0.9 of that per ZeRO-3 prefetch, parameters under ``10 d_model``
    elements kept whole): DeepSpeed's fixed defaults (5e8 elements) would allocate 2 GB of buckets for any
    model."""
    bucket = d_model * d_model
    zero: dict = {"stage": zero_stage, "elastic_checkpoint": False, "reduce_bucket_size": bucket,
                  "allgather_bucket_size": bucket}
    if zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": int(0.9 * bucket),
                     "stage3_param_persistence_threshold": 10 * d_model})
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
            "gradient_clipping": grad_clip, "zero_optimization": zero, "bf16": {"enabled": bf16},
            # our torch AdamW also with offload (DeepSpeedCPUAdam would compile its C++ op on first use)
            "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


_MASTERS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
"""The ZeRO optimizers' attributes holding a rank's fp32 master partition (ZeRO-1/2, ZeRO-3)."""
_HOST_OPTIMIZER_BUFFERS = (*_MASTERS, "param_buffer_of_bit16_for_cpu_offload_groups",  # ZeRO-1/2
                           "temp_grad_buffer_for_cpu_offload", "accumulated_grads_in_cpu",
                           "grad_partitions_flat_buffer")  # ZeRO-3
"""The ZeRO optimizers' attributes that DeepSpeed allocates on the host when the optimizer is offloaded."""


def _flat_tensors(items):
    """The tensors in ``items``: tensors, and lists, tuples and dict values of them (nested)."""
    for item in items:
        if torch.is_tensor(item):
            yield item
        elif isinstance(item, dict):
            yield from _flat_tensors(item.values())
        elif isinstance(item, (list, tuple)):
            yield from _flat_tensors(item)


def _storage_bytes(tensors) -> int:
    """The bytes of the storages behind ``tensors`` and their gradients, each storage once."""
    storages = {}
    for t in tensors:
        for u in (t, t.grad):
            if u is not None and u.numel():
                storages[u.untyped_storage().data_ptr()] = u.untyped_storage().nbytes()
    return sum(storages.values())


class DeepSpeedOptimizer:
    """The DeepSpeed engine around this rank's (tensor-parallel, single-stage) model, behind the trainer's optimizer
    interface (``param_groups`` for the LR schedule, ``state_bytes``, ``ownership``), plus ``train_batch``: one
    training step over the rank's batch. Its state is checkpointed per rank (``DeepSpeedOptimizerState``)."""

    tp_reshardable = False
    owners: dict = {}

    def __init__(self, model: ParallelModel, param_groups: list[dict], betas: tuple[float, float], eps: float,
                 config: dict):
        import deepspeed

        if model.pipeline is not None:
            raise ValueError("the DeepSpeed engine runs one pipeline stage (parallel.pp=1)")
        self.model = model
        self.comm_stats = None
        module = model.stages[0]
        params = dict(module.named_parameters())
        for name, p in params.items():
            if model.placements.get(name) is not None:
                p.tensor_model_parallel = True  # DeepSpeed's clipping counts it on every tp rank
        if model.tp_comm is not None:
            for name in sorted(model.partial):
                if name in params:
                    params[name].register_hook(lambda grad: model.tp_comm.all_reduce_(grad.clone()))
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in param_groups]
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps)
        self.micro_batch = config["train_micro_batch_size_per_gpu"]
        self.engine, self.zero, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                                            mpu=MeshMPU(model.dims))
        """The engine and its ZeRO optimizer."""

    @property
    def param_groups(self) -> list[dict]:
        return self.zero.param_groups

    def train_batch(self, x: torch.Tensor, y: torch.Tensor, autocast) -> tuple[torch.Tensor, float]:
        """Forward and backward of this rank's batch in micro-batches, then the optimizer step (DeepSpeed steps
        at the accumulation boundary); the mean loss and the clipped-before global gradient norm."""
        x, y = x.to(self.model.device), y.to(self.model.device)
        steps = x.shape[0] // self.micro_batch
        total = torch.zeros((), device=self.model.device)
        for i in range(steps):
            sl = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            with autocast:
                loss = self.engine(x[sl], y[sl])
            self.engine.backward(loss)  # scaled by 1 / accumulation inside
            self.engine.step()
            total += loss.detach()
        norm = self.engine.get_global_grad_norm()
        return total / steps, float(norm) if norm is not None else float("nan")

    def _attributes(self, names) -> list[torch.Tensor]:
        """The tensors the ZeRO optimizer holds under the attributes ``names`` (those it has)."""
        return list(_flat_tensors(getattr(self.zero, name, None) for name in names))

    def state_bytes(self) -> int:
        """Optimizer-state bytes this rank holds (its ZeRO partition); before the first step, which allocates
        them, AdamW's two fp32 moments of this rank's fp32 master partition."""
        state = list(_flat_tensors(self.zero.state.values()))
        if state:
            return _storage_bytes(state)
        return 2 * 4 * sum(m.numel() for m in self._attributes(_MASTERS))

    def offloaded_bytes(self) -> int:
        """Bytes this rank keeps on DeepSpeed's offload device (the host), each storage once: with
        ``offload_optimizer`` the fp32 master partition and its gradients, the optimizer state and the host
        staging buffers; with ``offload_params`` the parameter partitions and their host buffers. On a GPU they
        are what offload takes off the device."""
        def offloaded(cfg) -> bool:
            return cfg is not None and str(getattr(cfg.device, "value", cfg.device)) == "cpu"

        tensors = []
        if offloaded(self.engine.zero_offload_optimizer()):
            tensors += [*_flat_tensors(self.zero.state.values()), *self._attributes(_HOST_OPTIMIZER_BUFFERS)]
        if offloaded(self.engine.zero_offload_param()):
            tensors += [*_flat_tensors(getattr(p, "ds_tensor", None) for p in self.engine.module.parameters()),
                        *self._attributes(["param_groups_fp16_flat_cpu_memory"])]
        return _storage_bytes(tensors)

    def ownership(self) -> dict:
        return {"imbalance": 1.0}  # ZeRO partitions every tensor evenly over dp

    def gathered(self):
        """A context in which every parameter is whole on every rank (ZeRO-3 gathers them; writes made inside
        by rank 0 are partitioned again on exit); a no-op below ZeRO-3."""
        import contextlib

        import deepspeed

        if self.engine.zero_optimization_stage() < 3:
            return contextlib.nullcontext()
        # an evaluation's forward (under no_grad) can leave parameters fetched or in flight: release them first
        self.engine.empty_partition_cache()
        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=0)


class DeepSpeedOptimizerState:
    """This rank's ZeRO optimizer partition as a per-rank checkpoint part (one byte tensor holding DeepSpeed's
    own ``state_dict``; the manifest verifies it before it is read)."""

    per_rank = True

    def __init__(self, optimizer: DeepSpeedOptimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        import io

        buf = io.BytesIO()
        torch.save(self.optimizer.zero.state_dict(), buf)
        return {"zero": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)}

    def load_state_dict(self, state_dict: dict) -> None:
        import io

        blob = state_dict["zero"].numpy().tobytes()
        state = torch.load(io.BytesIO(blob), weights_only=False)  # verified against the manifest first
        model = self.optimizer.model
        own = [None] * model.dims.dp  # ZeRO reads the entry of this rank's dp index (the topology is checked before)
        own[model.dp_rank] = state
        self.optimizer.zero.load_state_dict(own, load_optimizer_states=True, load_from_fp32_weights=True)
