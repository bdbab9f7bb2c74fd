"""Data x tensor x pipeline parallelism over the plain model.

``ParallelDims`` (``mesh.py``) owns the degrees, the (pp, dp, tp) DeviceMesh and its groups; ``tensor.py``
shards every projection through its own ``shard()`` with the conjugate operators of ``comm.py``;
``pipeline.py`` splits the blocks into ``torch.distributed.pipelining`` stages; ``data.py`` reduces gradients
to their owners; ``runtime.ParallelModel`` applies them in that order and runs the train and eval steps.
``model/`` never imports this package and this package never imports ``pretrain/``.
"""
