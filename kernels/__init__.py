"""Products of the structured linear family.

One module per product (``lowrank``, ``blockdiag``, ``monarch``, ``blast``, ``nm``). Each exposes one call
site per product with a torch reference and a Triton path; ``kernels.dispatch`` chooses (Triton on CUDA,
the reference elsewhere, ``STRUCTORCH_KERNELS=triton|reference`` forces either). The Triton paths are
built on one strided batched-matmul kernel (``kernels.triton_bmm``) whose operands are addressed by
strides, so block layouts, Monarch's permutation, BLAST's coupling and tensor-parallel shards need no
copies; ``nm`` adds a mask-selection kernel and applies the mask inside the matmul's weight loads.
Layers in ``model/structured`` call only these functions, and call them on their local shard tensors.
"""
