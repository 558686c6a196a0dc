"""GPU memory plan of ``moelora.serve.Engine``: how many paged KV blocks fit beside everything else.

transformers' continuous batching, left to itself, gives its paged KV cache ``max_memory_percent``
(0.9) of the memory free when its loop starts, and its own activation estimate covers only the
attention read and the LM head. A moelora engine needs more next to the cache, all of it
allocated *after* the cache exists: the adapter slot pool (``adapter_memory_gb``), the
activations of one packed step (MixLoRA's virtual experts are top-k times the FFN hidden), and
the per-site stacks of a mixed step's adapters (``moelora.layers.adapted._stacked_lora`` /
``_moe_stacks``: every adapter of the engine's stack positions copied into one zero-padded tensor
per site, kept for the last composition; the positions, ``Engine._stack_positions``, are at most
``max_adapters_per_step`` resident slots + the base, the same bound as one step's adapters, and
``max_mixlora_per_step`` more for MixLoRA when that is set: then only those hold expert rows). The first H200 run had none of it left free and failed with CUDA out of
memory (README, Serving). So the engine sizes the cache itself and hands CB an explicit
``num_blocks``:

    kv = free - adapter_pool - step_activations - adapter_stacks - margin - CB's static tensors

``plan_kv_cache`` is that arithmetic, a pure function (tested on CPU); ``step_activation_bytes``
and ``adapter_stack_bytes`` are the conservative bounds it uses by default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GiB = 2**30


class MemoryPlanError(ValueError):
    """The requested pool, headroom and margin leave no room for a KV cache."""


@dataclass(frozen=True)
class ModelDims:
    """What the plan needs of the model (``from_config``)."""
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, cfg, dtype_bytes: int) -> "ModelDims":
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        return cls(num_layers=int(cfg.num_hidden_layers), hidden_size=int(cfg.hidden_size),
                   intermediate_size=int(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size),
                   num_attention_heads=heads, num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
                   head_dim=head_dim, vocab_size=int(cfg.vocab_size), dtype_bytes=int(dtype_bytes))

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int
    block_size: int
    max_batch_tokens: int
    free_bytes: int
    kv_bytes: int  # the KV cache tensors (num_blocks * block_size tokens, all layers, K and V)
    adapter_bytes: int  # the slot pool budget
    step_bytes: int  # one packed step's activations
    stack_bytes: int  # one mixed step's per-site adapter stacks
    margin_bytes: int
    cb_bytes: int  # CB's index / mask / IO tensors and the attention read of the whole cache (worst case)

    def as_dict(self) -> dict:
        return {k: (round(v / GiB, 3) if k.endswith("_bytes") else v) for k, v in asdict(self).items()}


def kv_bytes_per_token(d: ModelDims) -> int:
    """K and V of one token in every layer (what one page of the paged cache holds, all layers)."""
    return 2 * d.num_layers * d.kv_dim * d.dtype_bytes


def step_activation_bytes(d: ModelDims, max_batch_tokens: int, top_k: int = 2, factor: float = 2.0) -> int:
    """A conservative bound on one packed step's live activations (inference: one layer's at a
    time) for ``max_batch_tokens`` tokens, times ``factor`` for the temporaries not listed:
    residual/normed/attention/o_proj outputs (4 D), q/k/v (D + 2 kv_dim), the FFN's gate, up,
    activation and product (4 F), MixLoRA's virtual experts ((N, k, F) pre-activations, activation
    and weighted hidden: 4 k F) and LoRA expand outputs (2 F), plus the logits in the model dtype
    and two fp32 copies (CB's cast and the sampler) for every token."""
    per_token = (4 * d.hidden_size + d.hidden_size + 2 * d.kv_dim + 4 * d.intermediate_size
                 + 4 * top_k * d.intermediate_size + 2 * d.intermediate_size) * d.dtype_bytes
    logits = d.vocab_size * (d.dtype_bytes + 8)
    return int(factor * max_batch_tokens * (per_token + logits))


def adapter_stack_bytes(lora_row_bytes: int, adapters_per_step: int, expert_row_bytes: int | None = None,
                        mixlora_positions: int | None = None) -> int:
    """The per-site stacks of one mixed step: every stack position (the step's adapters and the
    base) zero-padded to the largest rank. The plain-LoRA stacks hold every position, each at
    most the largest adapter's plain-LoRA tensors (``lora_row_bytes``); MixLoRA's expert stacks
    (E experts per position, and the routers) hold every position too, each at most the largest
    MixLoRA adapter's expert and router tensors (``expert_row_bytes``; default ``lora_row_bytes``),
    unless the engine keeps MixLoRA adapters in ``mixlora_positions`` positions of their own
    (``Engine(max_mixlora_per_step=...)``): then the table has those beside the
    ``adapters_per_step`` others, and only they have expert rows. Each expert stack has one
    zero-expert row more (counted as one more position: a bound). With the defaults:
    (2 x (adapters + 1) + 1) x the largest adapter.

    A bound as long as the adapter of the largest rank targets every linear another adapter
    targets (a stack row is padded to the largest rank at every site the stacks cover);
    ``Engine.warmup()`` measures the stacks it built (``warmup_stats['stack_bytes']``)."""
    lora_positions = adapters_per_step + 1 + (mixlora_positions or 0)
    expert_positions = 1 + (lora_positions if mixlora_positions is None else mixlora_positions)
    expert = lora_row_bytes if expert_row_bytes is None else expert_row_bytes
    return int(lora_positions * lora_row_bytes + expert_positions * expert)


def plan_kv_cache(*, free_bytes: int, total_bytes: int, dims: ModelDims, adapter_bytes: int,
                  max_batch_tokens: int, block_size: int = 256, step_bytes: int | None = None,
                  stack_bytes: int = 0, attention_mask: bool = True, top_k: int = 2,
                  margin_fraction: float = 0.03, min_margin_bytes: int = GiB,
                  kv_memory_fraction: float | None = None) -> MemoryPlan:
    """Paged KV blocks that fit in ``free_bytes`` (measured after the model is on the device)
    beside the adapter pool (``adapter_bytes``), one step's activations (``step_bytes``; None:
    ``step_activation_bytes``), the adapter stacks of a mixed step (``stack_bytes``) and a margin
    (``margin_fraction`` of ``total_bytes``, at least ``min_margin_bytes``: the CUDA context,
    allocator rounding, cuBLAS workspaces). CB's own tensors are counted as CB counts them (its
    ``PagedAttentionMemoryHandler``): per cache token the read index (int64) and, for attention
    that needs a mask (``paged|sdpa``, ``paged|eager``), one mask row entry per batch token; per
    batch token the IO tensors; the mask's batch-token square. The attention read (the whole
    cache's K and V gathered and made contiguous, worst case) is counted per cache token too.
    ``kv_memory_fraction``: at most this share of ``free_bytes`` for the cache. Raises
    ``MemoryPlanError`` when nothing is left for a cache."""
    if max_batch_tokens < 1 or block_size < 1:
        raise ValueError(f"max_batch_tokens and block_size must be >= 1, got {max_batch_tokens}, {block_size}")
    a = dims.dtype_bytes
    M = int(max_batch_tokens)
    step = step_activation_bytes(dims, M, top_k) if step_bytes is None else int(step_bytes)
    margin = max(int(min_margin_bytes), int(margin_fraction * total_bytes))
    per_token = (kv_bytes_per_token(dims)  # the cache itself
                 + 4 * dims.kv_dim * a  # the attention read: gathered K, V and their contiguous copies
                 + 8  # read index (int64)
                 + (M * a if attention_mask else 0))  # mask [M, N + M]: the N part
    cb_fixed = M * (7 * 4 + 4 + 8 + 8) + (M * M * a if attention_mask else 0)
    left = int(free_bytes) - int(adapter_bytes) - step - int(stack_bytes) - margin - cb_fixed
    if kv_memory_fraction is not None:
        if not 0 < kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {kv_memory_fraction}")
        left = min(left, int(kv_memory_fraction * free_bytes))
    num_blocks = left // (per_token * block_size) if left > 0 else 0
    if num_blocks < 1:
        raise MemoryPlanError(
            f"no room for a KV cache: {free_bytes / GiB:.2f} GiB free, adapter pool {adapter_bytes / GiB:.2f}, "
            f"step activations {step / GiB:.2f} (max_batch_tokens={M}), adapter stacks {stack_bytes / GiB:.2f}, "
            f"margin {margin / GiB:.2f}, CB tensors {cb_fixed / GiB:.2f} GiB; lower adapter_memory_gb, "
            "max_batch_tokens or max_adapters_per_step, or set num_blocks")
    return MemoryPlan(num_blocks=int(num_blocks), block_size=int(block_size), max_batch_tokens=M,
                      free_bytes=int(free_bytes), kv_bytes=int(num_blocks * block_size * kv_bytes_per_token(dims)),
                      adapter_bytes=int(adapter_bytes), step_bytes=step, stack_bytes=int(stack_bytes),
                      margin_bytes=margin, cb_bytes=int(cb_fixed + num_blocks * block_size * (
                          per_token - kv_bytes_per_token(dims))))
