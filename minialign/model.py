"""A small GPT with the GPT-2 architecture and a KV cache with a length per row.

Architecture (Radford et al. 2019, as in nanoGPT): token + learned position embeddings, pre-LayerNorm
blocks (attention, then a tanh-GELU MLP of width 4C), a final LayerNorm, and an output head tied to
the token embedding. Attention runs through ``scaled_dot_product_attention`` (flash kernels on GPU;
cuDNN's attention is switched off, see below).

``KVCache`` holds preallocated keys/values and one length per row: a forward pass continues each row
from its length, and lowering a length forgets the row's tail (``truncate``: after a right-padded
prefill, each row is cut back to its own prompt). RAIN's "rewind" is a move in its search tree, not in
a cache: each tree node keeps its own tokens' keys/values, and a search continues a path by loading
them into rows of a cache (``rain_cache.CachePool``). Module and parameter names follow GPT-2's, so
``gpt2.from_pretrained`` maps a Hugging Face checkpoint onto this model key by key.
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# cuDNN's attention backend (eligible in bf16 on CUDA) builds an execution plan for every new (batch,
# heads, length) shape, and decoding, RAIN's search, the judge's batches and CTRL's samples all bring new
# shapes at every step: planning would cost more than the attention itself. Flash and memory-efficient
# attention take its place. Switched off process-wide: a per-call `sdpa_kernel` context costs every forward.
torch.backends.cuda.enable_cudnn_sdp(False)


@dataclass
class GPTConfig:
    vocab_size: int = 257   # the bytes tokenizer: 256 bytes + <|endoftext|>
    block_size: int = 256   # longest sequence (positions) the model can see
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class ModelError(RuntimeError):
    """A checkpoint or model folder that cannot be used, with a sentence saying why."""


GPT_SIZES = tuple(f.name for f in dataclasses.fields(GPTConfig))
MAX_PARAMETERS = 2_000_000_000  # GPT-2 XL has 1.56e9; a config asking for more is refused before allocating


def config_defects(sizes: dict, prefix: str = "") -> list[str]:
    """One sentence per defect of a model's sizes (``GPT_SIZES`` -> value), checked before anything is
    allocated: each a positive integer, ``n_embd`` a multiple of ``n_head``, and a bounded size."""
    bad = [key for key in GPT_SIZES if not (type(sizes.get(key)) is int and sizes[key] > 0)]
    if bad:
        return [f"'{prefix}{key}' should be a positive integer." for key in sorted(bad)]
    defects = []
    if sizes["n_embd"] % sizes["n_head"]:
        defects.append(f"'{prefix}n_embd' ({sizes['n_embd']}) is not a multiple of '{prefix}n_head' ({sizes['n_head']}).")
    d = sizes["n_embd"]
    parameters = (sizes["vocab_size"] + sizes["block_size"]) * d + 12 * sizes["n_layer"] * d * d  # tied embeddings
    if parameters > MAX_PARAMETERS:
        defects.append(f"the sizes describe about {parameters:.2g} parameters, more than the {MAX_PARAMETERS:.0e} "
                       "any GPT-2 has.")
    return defects


def all_finite(module: nn.Module) -> bool:
    """Whether every floating-point weight of ``module`` is finite (a diverged run's are not)."""
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:  # MemAvailable counts the page cache the kernel can reclaim
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_cache_fits(config: GPTConfig, rows: int, positions: int, device: torch.device, dtype=torch.float32) -> None:
    """Refuse, before allocating it, a KV cache that cannot fit in ``device``'s free memory."""
    needed = 2 * config.n_layer * rows * positions * config.n_embd * torch.finfo(dtype).bits // 8  # keys and values
    if needed > 2**28 and needed > free_memory(device):  # small caches always fit: no need to ask
        raise ModelError(f"a KV cache of {rows} rows x {positions} positions needs {needed / 2**30:.1f} GiB, more "
                         f"than the {free_memory(device) / 2**30:.1f} GiB free on {device}: ask for fewer samples "
                         "or candidates at once.")


class KVCache:
    """Preallocated keys and values for every layer, with a length per row.

    Tensors are (n_layer, B, max_len, n_head, head_dim). Row ``b`` holds valid entries at positions
    ``0 .. lengths[b]-1``; anything beyond is garbage that attention masks out and later writes overwrite.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        max_len = max_len or config.block_size
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, max_len, config.n_head, hd)
        check_cache_fits(config, batch_size, max_len, torch.device(device or "cpu"), dtype)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def truncate(self, length: int | torch.Tensor, rows=None) -> None:
        """Forget everything at or after ``length`` in the given rows (all rows by default)."""
        rows = slice(None) if rows is None else rows
        self.lengths[rows] = torch.minimum(self.lengths[rows], torch.as_tensor(length, device=self.lengths.device))

    def view(self, start: int, stop: int) -> "KVCache":
        """Rows start .. stop - 1 as a cache of their own that shares this one's memory: what a forward
        pass writes there lands here, and reading it copies nothing."""
        new = object.__new__(KVCache)
        new.k, new.v = self.k[:, start:stop], self.v[:, start:stop]
        new.lengths, new.max_len = self.lengths[start:stop], self.max_len
        return new

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache made of the given rows (repeats allowed), e.g. one row per sample of a prompt."""
        new = object.__new__(KVCache)
        new.k, new.v = self.k[:, rows].clone(), self.v[:, rows].clone()
        new.lengths, new.max_len = self.lengths[rows].clone(), self.max_len
        return new


@dataclass
class CachedStep:
    """What every layer needs to attend through the cache in one forward, computed once."""
    cache: KVCache
    rows: torch.Tensor       # (B, 1) row index of each query row
    positions: torch.Tensor  # (B, T) absolute position of each new token
    span: int                # no row needs keys beyond this many positions
    mask: torch.Tensor       # (B, 1, T, span): a query at position p sees keys 0..p of its own row
    subset: torch.Tensor | None  # (B,) the cache rows this forward continues, or None for all of them


def document_layout(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) and attention mask (B, 1, T, T) of packed documents, from the document index of
    each token (B, T): a token sees the earlier tokens of its own document, and its position counts them,
    so every document starts at position 0 (document masking, as if each had a row of its own)."""
    T = documents.shape[1]
    same = documents[:, :, None] == documents[:, None, :]  # (B, T, T)
    mask = same & torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()  # (B, T, T)
    return mask.sum(-1) - 1, mask[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, layer: int, cached: CachedStep | None, mask: torch.Tensor | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))  # (B, T, nh, hs)
        if cached is None:  # causal, or the packed documents' own mask (B, 1, T, T)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=mask is None)  # (B, nh, T, hs)
        else:
            cache, span = cached.cache, cached.span
            cache.k[layer][cached.rows, cached.positions] = k.to(cache.k.dtype)  # write at each row's positions
            cache.v[layer][cached.rows, cached.positions] = v.to(cache.v.dtype)
            own = slice(None) if cached.subset is None else cached.subset  # this forward's rows of the cache
            keys = cache.k[layer][own, :span].transpose(1, 2).to(q.dtype)  # (B, nh, span, hs)
            values = cache.v[layer][own, :span].transpose(1, 2).to(q.dtype)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=cached.mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, layer, cached, mask=None):
        x = x + self.attn(self.ln_1(x), layer, cached, mask)  # pre-LN residual blocks
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None, static_shapes: bool = False,
               rows: torch.Tensor | None = None, documents: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C) for tokens ``idx`` (B, T).

        With a cache, ``idx`` continues each row at its own length and the cache advances by T;
        ``rows`` (B,) continues only those cache rows (a batch whose finished rows stopped decoding).
        ``static_shapes`` attends over the whole preallocated cache instead of the longest row, so every
        shape is fixed and nothing waits on the GPU: the form a CUDA graph can capture (see
        ``fast/graphs.py``). ``documents`` (B, T), for training on packed rows (``data.pack_rows``): the
        document index of each token; each document then starts at position 0 and sees only itself.
        """
        B, T = idx.shape
        steps = torch.arange(T, device=idx.device)
        mask = None  # plain causal attention
        if documents is not None:
            pos, mask = document_layout(documents)
            span = T
        elif cache is None:
            pos = steps[None]  # (1, T)
            span = T  # known on the host: training never waits on the GPU here (nor breaks a compiled graph)
        else:
            pos = (cache.lengths if rows is None else cache.lengths[rows])[:, None] + steps  # (B, T)
            span = cache.max_len if static_shapes else int(pos.max()) + 1  # the latter reads the device
        if span > self.config.block_size:
            raise ModelError(f"sequence of length {span} exceeds the model's context of "
                             f"{self.config.block_size} tokens; shorten the prompt or max_new_tokens.")
        cached = None
        if cache is not None:
            visible = torch.arange(span, device=idx.device)[None, None, :] <= pos[:, :, None]  # (B, T, span)
            index = torch.arange(B, device=idx.device) if rows is None else rows
            cached = CachedStep(cache, index[:, None], pos, span, visible[:, None], rows)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, layer, cached, mask)
        if cache is not None:
            if rows is None:
                cache.lengths += T
            else:
                cache.lengths[rows] += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, static_shapes: bool = False,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab) for tokens ``idx`` (B, T); ``documents`` as in ``hidden``."""
        return self.lm_head(self.hidden(idx, cache, static_shapes, documents=documents))

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)


def next_token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log p(. | ids[:, :t+1]) over the whole vocabulary at every position: (B, T-1, V), in fp32.

    A function rather than a method so that a DDP-wrapped model goes through DDP's forward."""
    return torch.log_softmax(model(ids[:, :-1]).float(), -1)


def token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) at every position: (B, T-1); the caller masks what it needs."""
    return next_token_logprobs(model, ids).gather(-1, ids[:, 1:, None]).squeeze(-1)


def row_chunks(n: int, size: int) -> list[slice]:
    """Slices of ``size`` rows covering ``n`` rows (one slice of all rows when ``size`` is 0)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def micro_batches(ids: torch.Tensor, size: int, lengths: torch.Tensor | None = None) -> list[tuple[torch.Tensor, int]]:
    """Micro-batches of ``size`` rows (0 = all at once) of the right-padded ``ids`` (B, T): (row indices,
    width) each. With the rows' real ``lengths`` (B,) the rows go shortest first and each micro-batch is
    cut to its longest row, which drops only padding (attention is causal); without, rows in order at
    full width."""
    if lengths is None:
        return [(torch.arange(ids.size(0))[rows], ids.size(1)) for rows in row_chunks(ids.size(0), size)]
    order = lengths.argsort()  # (B,) shortest first
    return [(order[rows], int(lengths[order[rows]].max())) for rows in row_chunks(len(lengths), size)]


@torch.no_grad()
def sequence_logprobs(model: nn.Module, ids: torch.Tensor, micro_batch: int,
                      lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``token_logprobs`` (B, T-1) computed ``micro_batch`` rows at a time (0 = all at once): the
    (rows, T, V) logits are the memory peak, and for GPT-2 a whole RL batch of them does not fit a GPU.
    With the rows' real ``lengths`` (B,) rows of similar length run together, each micro-batch cut to its
    longest row; the padding positions beyond it come back as 0. Rows come back in input order."""
    out = torch.zeros(ids.size(0), ids.size(1) - 1, device=ids.device)  # (B, T-1)
    for rows, width in micro_batches(ids, micro_batch, lengths):
        out[rows, : width - 1] = token_logprobs(model, ids[rows, :width])
    return out
