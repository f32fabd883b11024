"""Meshes, the rules table, and expert parallelism against the single-device MoE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from deepseek_jax import sharding
from deepseek_jax.layers.moe import MoE
from deepseek_jax.model import abstract_params


def test_mesh_shape_resolves_the_rest():
    assert sharding.mesh_shape({"data": -1, "expert": 2}, 8) == (4, 1, 2, 1)
    assert sharding.make_mesh({"fsdp": 8}).shape == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}


@pytest.mark.parametrize("sizes,match", [
    ({"data": -1, "fsdp": -1}, "at most one axis"),
    ({"data": 3}, "does not divide 8 devices"),
    ({"data": 2, "tensor": 2}, "uses 4 devices, but 8"),
])
def test_bad_meshes_are_named(sizes, match):
    with pytest.raises(sharding.MeshError, match=match):
        sharding.make_mesh(sizes)


def test_indivisible_model_dims_name_param_and_axis():
    cfg = tiny_config(n_routed_experts=12, n_group=4, topk_group=2)  # 12 experts over expert=8
    with pytest.raises(sharding.MeshError, match=r"experts.*experts=12.*\('expert',\) of size 8"):
        sharding.check_divisible(abstract_params(cfg), sharding.make_mesh({"expert": 8}))
    cfg = tiny_config(num_attention_heads=3)
    with pytest.raises(sharding.MeshError, match=r"heads=3.*tensor"):
        sharding.check_divisible(abstract_params(cfg), sharding.make_mesh({"data": 4, "tensor": 2}))


def test_param_shardings_follow_rules():
    cfg = tiny_config()
    mesh = sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2})
    sh = sharding.logical_shardings(mesh, abstract_params(cfg))
    assert tuple(sh["layers_1"]["mlp"]["experts"]["gate"].spec) == (None, "expert", "fsdp", "tensor")
    assert tuple(sh["layers_1"]["attn"]["q_b"]["kernel"].spec) == (None, "fsdp", "tensor", None)
    assert tuple(sh["embed"]["embedding"].spec) == ("tensor", "fsdp")


@pytest.mark.parametrize("sizes,chunk", [({"data": 2, "expert": 2, "tensor": 2}, 0), ({"expert": 8}, 0),
                                         ({"fsdp": 2, "expert": 4}, 4)])
def test_expert_parallel_moe_equals_single_device(sizes, chunk):
    cfg = tiny_config(moe_chunk_tokens=chunk)  # chunk 4: each device's 12 tokens go in 3 rounds
    x = jax.random.normal(jax.random.key(0), (8, 12, cfg.hidden_size))
    params = nn.meta.unbox(MoE(cfg).init(jax.random.key(1), x)["params"])
    params["router"]["e_score_correction_bias"] = jax.random.normal(jax.random.key(2), (16,)) * 0.1

    def loss(p, x):
        y, _ = MoE(cfg).apply({"params": p}, x, mutable=["router_stats"])
        return jnp.sum(jnp.sin(y)), y

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y0), g0 = grad(params, x)
    with jax.set_mesh(sharding.make_mesh(sizes)):
        (_, y1), g1 = jax.jit(grad)(params, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def test_data_layout_puts_leftover_batch_axes_on_the_sequence():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    assert sharding.data_layout(mesh, 8) == (("data", "fsdp", "expert"), ())
    assert sharding.data_layout(mesh, 4) == (("data", "fsdp"), ("expert",))
    assert sharding.data_layout(mesh, 2) == (("data",), ("fsdp", "expert"))
    assert sharding.data_layout(mesh, 1) == ((), ("data", "fsdp", "expert"))
    table = dict(sharding.rules_for(mesh, 2))
    assert table["batch"] == ("data",) and table["length"] == ("fsdp", "expert") and table["embed"] == "fsdp"


@pytest.mark.parametrize("dsa", [False, True])
def test_context_parallel_step_equals_single_device(dsa):
    """2 rows on 8 devices (data 2 x fsdp 2 x expert 2): rows over data, each row's 64 tokens over fsdp x expert
    (context parallelism; attention in query blocks of 8, keys gathered). Loss and gradients equal one device's."""
    from deepseek_jax.model import forward, init_params

    extra = dict(index_n_heads=4, index_head_dim=16, index_topk=12, index_key_block=16) if dsa else {}
    cfg = tiny_config(attention_chunk=8, max_position_embeddings=64, **extra)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(64), (2, 64))
    segments = jnp.ones((2, 64), jnp.int32).at[1, 40:].set(2)  # two documents in row 1
    positions = positions.at[1, 40:].set(jnp.arange(24))

    def loss(p):
        out = forward(cfg, p, tokens, positions, segments, indexer_loss=dsa)
        kl = sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(out.indexer_stats))
        return jnp.sum(jnp.sin(out.logits)) + jnp.sum(jnp.cos(out.mtp_logits)) + kl

    want = jax.jit(jax.value_and_grad(loss))(params)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    rules = sharding.rules_for(mesh, 2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert sharding.length_shards() == 4
        p = jax.device_put(params, sharding.logical_shardings(mesh, abstract_params(cfg)))
        got = jax.jit(jax.value_and_grad(loss))(p)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    errors = jax.tree_util.tree_map(lambda a, b: float(abs(a - b).max() / (abs(b).max() + 1e-12)), got[1], want[1])
    assert max(jax.tree_util.tree_leaves(errors)) < 1e-4, errors
