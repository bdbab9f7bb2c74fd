"""The GPT built from structured projections."""

import pytest
import torch

from model.config import PROJECTIONS, ModelConfig
from model.config import StructureSpec as S
from model.gpt import GPT


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32,
                structure={"attn": S("lowrank", rank=8), "mlp": S("blast", blocks=4, rank=8),
                           "o": S("monarch", blocks=4)})
    base.update(kw)
    return ModelConfig(**base)


def built(c: ModelConfig, seed: int = 0, meta: bool = True) -> GPT:
    if meta:
        with torch.device("meta"):
            model = GPT(c)
        model.to_empty(device="cpu")
    else:
        model = GPT(c)
    model.init_weights(seed)
    return model


def test_init_is_a_function_of_the_seed_only():
    a, b = built(cfg(), meta=True), built(cfg(), meta=False)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    c = built(cfg(), seed=1)
    assert not torch.equal(a.layers["0"].mlp.up.u, c.layers["0"].mlp.up.u)


def test_each_projection_gets_its_own_structure():
    m = built(cfg())
    kinds = {n: type(layer).name for n, _, layer in m.layers["0"].projections()}
    assert tuple(kinds) == PROJECTIONS
    assert kinds == {"q": "lowrank", "k": "lowrank", "v": "lowrank", "o": "monarch",
                     "up": "blast", "gate": "blast", "down": "blast"}


def test_param_and_flop_counts_add_up_from_layers():
    c = cfg()
    m = built(c)
    per_block = 8 * (64 + 64) + 2 * 8 * (64 + 32) + 4 * (64 + 64) + 2 * 8 * (64 + 96 + 16) + 8 * (96 + 64 + 16)
    norms = 64 * (2 * c.n_layers + 1)
    assert m.num_params() == c.n_layers * per_block + norms + 2 * 97 * 64
    assert m.num_params(exclude_embedding=True) == m.num_params() - 97 * 64
    f = m.flops_per_token(16)
    assert f["projections"] == 2 * c.n_layers * per_block
    assert f["attention"] == c.n_layers * 4 * 64 * 17 // 2
    assert f["head"] == 2 * 64 * 97 and f["train"] == 3 * f["forward"]


def test_tied_embeddings_share_one_tensor_after_meta_init():
    m = built(cfg(tie_embeddings=True))
    assert m.output.weight is m.tok_embeddings.weight
    assert m.num_params() == built(cfg()).num_params() - 97 * 64


def test_causal_gqa_forward_and_loss():
    m = built(cfg())
    tokens = torch.randint(0, 97, (2, 16))
    logits = m(tokens)
    assert logits.shape == (2, 16, 97)
    prefix = m(tokens[:, :8])
    torch.testing.assert_close(prefix, logits[:, :8], rtol=1e-5, atol=1e-5)  # causal: no peeking ahead
    loss = m(tokens, tokens)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_stage_without_embedding_and_head_maps_hidden_states():
    m = built(cfg())
    m.tok_embeddings, m.output, m.norm = None, None, None
    h = torch.randn(2, 8, 64)
    assert m(h).shape == (2, 8, 64)


def test_sequence_longer_than_rope_tables_is_refused():
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=32"):
        built(cfg())(torch.zeros(1, 33, dtype=torch.long))
