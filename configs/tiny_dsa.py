"""DeepSeek Sparse Attention at laptop scale, the way V3.2 was made from V3.1 (V3.2 sec. 2.1):

  python -m launch.train --config=configs/tiny_dsa.py --workdir=runs/dsa
  python -m launch.train --config=configs/tiny_dsa.py:dense --workdir=runs/dsa   # + a dense continuation to compare

Stage `base` pretrains the tiny dense V3-style model on the embedded corpus at 256 tokens. `dsa_warmup` adds a
fresh lightning indexer and trains only it (the main model frozen, attention dense) on KL(p_main || softmax(I)),
logging the share of the attention mass its top-32 keys capture (indexer_mass; eval_indexer_mass on held-out
text, also at step 0, before any update). `dsa_sparse` then trains everything with each query attending to its
32 selected keys of up to 256, the indexer on the KL over those keys. With `:dense`, stage `dense` continues the
base model with dense attention on the same data and schedule as `dsa_sparse`, for the loss comparison.
"""

import ml_collections

from configs import tiny

INDEXER = dict(index_n_heads=4, index_head_dim=32, index_topk=32)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    def stage(name: str, steps: int, lr: float, **model) -> ml_collections.ConfigDict:
        c = tiny.get_config()
        c.stage = name
        c.steps = steps
        c.log_every = 10
        c.eval_every = 50
        c.checkpoint_every = 100
        c.data.update(seq_len=256, batch_size=8)
        c.model.update(attention_chunk=64, **model)
        c.optim.update(lr=lr, warmup_steps=min(30, steps // 5))
        return c

    base = stage("pretrain", 300, 3e-3)
    warmup = stage("dsa_warmup", 100, 1e-3, **INDEXER)  # V3.2: lr 1e-3 for the indexer alone
    warmup.optim.update(decay_start=1.0, weight_decay=0.0)
    sparse = stage("dsa_sparse", 150, 3e-4, **INDEXER)
    sparse.optim.update(decay_start=1.0)

    c = ml_collections.ConfigDict()
    c.chain = ("base", "dsa_warmup", "dsa_sparse")
    c.base, c.dsa_warmup, c.dsa_sparse = base, warmup, sparse
    if variant == "dense":
        dense = stage("pretrain", sparse.steps, sparse.optim.lr)
        dense.optim.update(decay_start=1.0)
        dense.init_from = "base"  # the same starting point and data as dsa_sparse, dense attention throughout
        c.chain = (*c.chain, "dense")
        c.dense = dense
    elif variant:
        raise ValueError(f"configs/tiny_dsa.py:{variant}: the only variant is 'dense'")
    return c
