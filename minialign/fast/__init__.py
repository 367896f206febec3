"""Speed: the batched and GPU machinery, apart from the eager core it is tested against.

- ``rain_batch``: many RAIN searches in lockstep, their forward passes answered as one batch;
- ``rain_eval``: RAIN against vanilla decoding on held-out world prompts, searched in batches;
- ``graph_pool``: RAIN's cache pool with its passes replayed as CUDA graphs (chosen on CUDA only);
- ``graphs``: greedy and sampled decoding with a static KV cache replayed as a CUDA graph.

Nothing in the core imports from here; every path here gives the answers of the eager path.
"""
