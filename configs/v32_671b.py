"""DeepSeek-V3.2 671B (DSA): V3's shapes plus a lightning indexer per layer (64 heads of 128, top-2048 keys), at the
128k context of V3.2's sparse training (sec. 2.1: 480 rows of 128K tokens a step; here 4 rows fit v5p-256).

  python -m launch.compile --config=configs/v32_671b.py --topology=v5p-256

Four rows on 128 chips are fewer rows than batch shards, so the sequence is split too: rows over none of the batch
axes, each row's 131,072 tokens over fsdp x expert (1,024 per chip; context parallelism, sharding.data_layout).
Attention is DSA's: per block of 64 queries the indexer's running top-2048 over key blocks of 4,096, then the
selected latents gathered and attended in the absorbed form; the latents (576 values per token) and indexer keys
(128) are all-gathered per layer. The stage is dsa_sparse: everything trains, the indexer on its KL.
"""

import ml_collections

from configs import v3_671b


def get_config() -> ml_collections.ConfigDict:
    c = v3_671b.get_config()
    c.stage = "dsa_sparse"
    c.model.update(model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048,
                   index_key_block=4096, attention_chunk=64)
    c.data.seq_len = 131072
    c.data.batch_size = 4
    c.optim.lr = 7.3e-6  # V3.2's sparse stage
    return c
