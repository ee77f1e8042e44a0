"""Generation with a KV cache on any (tp, pp, dp) layout, reusing the training model's chunks and kernels.

kv_cache.py   the KVCache object: keys and values of this rank's layers and heads, and its bytes
sampling.py   greedy and seeded sampling over a vocabulary split across tp ranks
generator.py  prefill and decode steps, micro-batches flowing through the pipeline stages
"""
