"""Decoding with a static KV cache whose one-token forward is captured once as a CUDA graph.

Why: a decode step of a small model at batch 1 is a few hundred tiny kernels, and on a GPU launching
them from Python takes longer than running them. A CUDA graph records the launches of one step once;
each later step replays them all with a single call. Capture has three conditions, and each shapes the
code here:

- fixed shapes: the step attends over the whole preallocated cache (``GPT.forward(static_shapes=True)``)
  with a mask, instead of over the longest row so far;
- fixed memory: the input token, the cache and the output logits are buffers allocated once; a step
  copies its token into ``self.token`` and reads the logits from ``self.logits``;
- no host synchronisation: positions are read from the cache's length tensor on the device, which the
  step itself advances, and the token loop checks whether every row has stopped only every few steps.

The prompt prefill (variable length) runs eagerly into the same cache; the token choice (greedy or
sampled) runs eagerly after each replay, so every option of ``sampling.token_loop`` works unchanged. On a
CPU there is nothing to capture: the same fixed-shape step runs eagerly, which is how the tests compare
it with the plain decoder; the graph replay itself is tested where CUDA is available.
"""
import torch

from ..model import GPT, ModelError
from ..sampling import prefill, token_loop


class GraphDecoder:
    """Decode ``batch_size`` rows of at most ``max_len`` tokens (prompt + new) with a replayed CUDA graph.

    Build once, then call ``generate`` as often as needed: the capture (a few warm-up forwards and one
    recorded step) is paid once per decoder.
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int, use_graph: bool | None = None,
                 warmup_steps: int = 3):
        if max_len > model.config.block_size:
            raise ModelError(f"max_len {max_len} exceeds the model's context of {model.config.block_size} tokens.")
        device = model.lm_head.weight.device
        self.model, self.batch_size = model, batch_size
        self.cache = model.new_cache(batch_size, max_len)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1) the step's input
        self.graph = None
        if device.type == "cuda" if use_graph is None else use_graph:
            self._capture(warmup_steps)

    def _forward(self) -> torch.Tensor:
        return self.model(self.token, self.cache, static_shapes=True)[:, -1]  # (B, V); lengths += 1

    @torch.no_grad()
    def _capture(self, warmup_steps: int) -> None:
        # Warm-up on a side stream, outside the capture: cuBLAS handles, allocator blocks and kernel
        # choices are made here, because none of them may happen while a graph is being recorded.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._forward()
                self.cache.lengths.zero_()  # each warm-up step writes position 0, whatever max_len is
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):  # record on the warmed-up stream
            self.logits = self._forward()  # recorded, not run; its output buffer is reused by every replay

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); next-token logits (B, V), valid until the next step."""
        self.token.copy_(token[:, None])
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop: set[int], check_every: int = 16,
                 **sampling) -> list[list[int]]:
        """Like ``sampling.generate`` (same arguments and result), for exactly ``batch_size`` prompts."""
        longest = max(len(p) for p in prompts)
        if len(prompts) != self.batch_size or longest + max_new_tokens > self.cache.max_len:
            raise ModelError(f"this decoder holds {self.batch_size} rows of {self.cache.max_len} tokens; got "
                             f"{len(prompts)} prompts of up to {longest} tokens plus {max_new_tokens} new ones.")
        self.cache.lengths.zero_()
        logits = prefill(self.model, prompts, self.cache)
        return token_loop(self.step, logits, max_new_tokens, stop, check_every=check_every, **sampling)
