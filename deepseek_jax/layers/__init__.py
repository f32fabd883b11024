"""One technique per file: norm, rope, linear, mla, mlp, moe, gmm."""
