"""Fused "merge the selected LoRA experts into the backbone" for LoRA-Switch batch-1 decode.

LoRA-Switch (Kong et al. 2024, arXiv 2405.17741) picks K of N LoRA experts once per token
and merges them into EVERY adapted linear m before the plain backbone decodes the token:

    W_m <- W0_m + sum_k g_k * s_m * B_m[idx_k] @ A_m[idx_k]      (pristine form, the default)

One Triton launch covers all matrices of all shapes. The delta is accumulated in fp32 and rounded
once to W's dtype, and W0 is a pristine copy owned by the plan, so each token's weight is exactly
round(W0 + delta_t): no drift, and `restore()` is bit-exact. It moves the same bytes as the
paper's in-place form (read one W-sized tensor, write one). The in-place form is kept as an option.

Layout: the plan re-points every weight as a view into one flat buffer it owns (the Parameter
objects survive, so the model keeps working), keeps W0 and the zero-padded adapters in flat
buffers of the same kind, plus small device tables, so a 1-D persistent grid walks all tiles of
all matrices. Nothing is allocated per call and idx/gate never leave the device, so a merge can be
captured in a CUDA graph (feed it static idx/gate buffers).

File layout (Liger style): `_merge_kernel` (@triton.jit) -> `MergePlan` (packing + launcher)
-> `merge_selected_adapters` (functional wrapper); `merge_selected_adapters_reference` is the
eager ground truth the tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import backend, tiles
from ._host import cdiv, pow2_at_least

_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALIGN = 16  # element alignment of every packed matrix: lets the GPU vectorise row loads


@triton.jit
def _expert_delta(acc, a_ptr, b_ptr, a_off, b_off, e, g, n_out, n_in, num_experts, rows, cols,
                  RP: tl.constexpr, IEEE: tl.constexpr):
    """acc + g * B[e][rows, :] @ A[e][:, cols]; an out-of-range e contributes nothing."""
    rr = tl.arange(0, RP)
    # Masking instead of trusting e keeps a bad router index from reading foreign memory;
    # the launcher's error flag reports it (checking on the host would need a sync).
    # (The masks are plain comparisons against a zeroed bound: the interpreter turns
    # `bool_block & bool_scalar` into ints, which tl.load rejects. The always-true `rr < RP`
    # only gives the mask the tile's full shape.)
    ok = (e >= 0) & (e < num_experts)
    e64 = tl.where(ok, e, 0).to(tl.int64)
    out_lim = tl.where(ok, n_out, 0)
    in_lim = tl.where(ok, n_in, 0)
    b = tl.load(b_ptr + b_off + e64 * n_out * RP + rows[:, None] * RP + rr[None, :],
                mask=(rows[:, None] < out_lim) & (rr[None, :] < RP), other=0.0)
    a = tl.load(a_ptr + a_off + e64 * RP * n_in + rr[:, None] * n_in + cols[None, :],
                mask=(rr[:, None] < RP) & (cols[None, :] < in_lim), other=0.0)
    # g*s is folded into B in fp32 and the dot accumulates straight into the W tile: no second
    # fp32 tile of registers (the register file bounds how many W bytes are in flight per SM).
    # fp32 operands also sidestep the interpreter's broken 16-bit math.
    b = b.to(tl.float32) * g
    a = a.to(tl.float32)
    if IEEE:
        # fp32 weights deserve an fp32 delta; TF32 would cost ~2^-11 of |delta|.
        return tl.dot(b, a, acc, input_precision="ieee")
    # 16-bit W: TF32 operands, ~2^-11 relative on the delta, at or below W's own rounding
    # (2^-9 |W| in bf16, 2^-11 |W| in fp16, and |delta| << |W| for LoRA); tensor cores keep the
    # 2*K*R flops per element hidden behind the memory traffic (fp32 FMAs would not be).
    return tl.dot(b, a, acc)


# `force` changes per call; unspecialised, force=0 and force=1 share one binary, so a warm-up
# with either leaves nothing to compile during CUDA-graph capture.
@triton.jit(do_not_specialize=["force"])
def _merge_kernel(
    w_ptr, w0_ptr, a_ptr, b_ptr,   # flat W (written), W0 (read; == w_ptr in place), adapters
    meta_ptr,                      # int64 [M, 6]: w_off, a_off, b_off, out, in, first tile
                                   #   (offsets and in stored divided by ALIGN)
    scale_ptr,                     # fp32 [M]: s_m
    tile_mat_ptr,                  # int32 [num_tiles]: matrix of each tile
    idx_ptr, gate_ptr,             # the new selection, [K] each, caller-owned
    prev_idx_ptr, prev_gate_ptr,   # the merged selection, [K] each, plan-owned
    flags_ptr,                     # int32 [3]: state valid, bad index seen, arrival counter
    num_tiles, num_experts, force,
    K: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ALIGN: tl.constexpr, PRISTINE: tl.constexpr, IEEE: tl.constexpr, EVICT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ks = tl.arange(0, KP)
    kmask = ks < K
    new_idx = tl.load(idx_ptr + ks, mask=kmask, other=0).to(tl.int32)
    new_gate = tl.load(gate_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
    # Every program reads the previous selection into registers here, BEFORE its arrival below.
    old_idx = tl.load(prev_idx_ptr + ks, mask=kmask, other=0)
    old_gate = tl.load(prev_gate_ptr + ks, mask=kmask, other=0.0)
    valid = tl.load(flags_ptr)
    changed = tl.sum(((new_idx != old_idx) | (new_gate != old_gate)).to(tl.int32), axis=0)
    skip = (changed == 0) & (valid != 0) & (force == 0)

    # Last-arrival update of the state (the classic "last block" pattern): the acq_rel atomic
    # orders each program's reads above before its arrival, so the program that arrives last
    # knows nobody will read the old state again and may overwrite it. This replaces host-side
    # ping-pong buffers, whose parity would be a Python int baked into a captured CUDA graph.
    # The barrier first: the state was loaded by many threads, the atomic is issued by one, and
    # a release only orders the issuing thread's own accesses (bar.sync makes it cumulative).
    tl.debug_barrier()
    arrived = tl.atomic_add(flags_ptr + 2, 1, sem="acq_rel", scope="gpu")
    if arrived == nprog - 1:
        tl.store(prev_idx_ptr + ks, new_idx, mask=kmask)
        tl.store(prev_gate_ptr + ks, new_gate, mask=kmask)
        tl.store(flags_ptr, 1)
        bad = tl.sum((((new_idx < 0) | (new_idx >= num_experts)) & kmask).to(tl.int32), axis=0)
        if bad > 0:
            tl.store(flags_ptr + 1, 1)
        tl.store(flags_ptr + 2, 0)  # ready for the next launch (stream order publishes it)

    # Skipping = an empty tile loop; no early return, so every program took part above.
    start = tl.where(skip, num_tiles, pid)
    for t in range(start, num_tiles, nprog):
        m = tl.load(tile_mat_ptr + t).to(tl.int64)
        # The table stores offsets and `in` divided by ALIGN; multiplying by the constexpr here
        # lets the compiler prove 16-byte alignment and mask constancy, so W moves in vector
        # loads/stores. (tl.multiple_of hints on the loaded scalars get lost when the loop is
        # software-pipelined: on sm_90 the W tile then went through 2-byte accesses.)
        w_off = tl.load(meta_ptr + m * 6 + 0) * ALIGN
        a_off = tl.load(meta_ptr + m * 6 + 1) * ALIGN
        b_off = tl.load(meta_ptr + m * 6 + 2) * ALIGN
        n_out = tl.load(meta_ptr + m * 6 + 3)
        n_in = tl.load(meta_ptr + m * 6 + 4) * ALIGN
        local = t - tl.load(meta_ptr + m * 6 + 5)
        s = tl.load(scale_ptr + m)
        n_col_blocks = tl.cdiv(n_in, BN)
        # Row-major tile order: neighbouring tiles share B rows and sweep A columns (L2 reuse).
        rb = local // n_col_blocks
        cb = local - rb * n_col_blocks
        rows = rb * BM + tl.arange(0, BM)
        cols = cb * BN + tl.arange(0, BN)
        rmask = rows < n_out
        cmask = cols < n_in
        wmask = rmask[:, None] & cmask[None, :]
        w_offs = w_off + rows[:, None] * n_in + cols[None, :]
        # EVICT "evict_first" (stream=True): W0/W are touched once per merge, so they should not
        # push the adapters (re-read by every tile of a matrix) out of L2. "" = default policy.
        acc = tl.load(w0_ptr + w_offs, mask=wmask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        if not PRISTINE:
            # In-place (paper) form: take the merged selection out first, in fp32.
            for k in tl.static_range(K):
                e = tl.sum(tl.where(ks == k, old_idx, 0), axis=0)
                g = tl.sum(tl.where(ks == k, old_gate, 0.0), axis=0) * s
                acc = _expert_delta(acc, a_ptr, b_ptr, a_off, b_off, e, -g, n_out, n_in,
                                    num_experts, rows, cols, RP, IEEE)
        for k in tl.static_range(K):
            e = tl.sum(tl.where(ks == k, new_idx, 0), axis=0)
            g = tl.sum(tl.where(ks == k, new_gate, 0.0), axis=0) * s
            acc = _expert_delta(acc, a_ptr, b_ptr, a_off, b_off, e, g, n_out, n_in,
                                num_experts, rows, cols, RP, IEEE)
        # The single rounding of the whole update (round-to-nearest-even, like torch's .to()).
        tl.store(w_ptr + w_offs, acc.to(w_ptr.dtype.element_ty), mask=wmask, eviction_policy=EVICT)


def merge_selected_adapters_reference(
    weights: Sequence[torch.Tensor], pristine: Sequence[torch.Tensor],
    lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor], scalings: Sequence[float],
    idx: torch.Tensor, gate: torch.Tensor,
) -> None:
    """Eager ground truth: W_m <- round(W0_m + sum_k g_k s_m B_m[idx_k] A_m[idx_k]), fp32 math.

    `pristine` holds the W0_m to merge from (pass `weights` themselves for one in-place add).
    """
    g = gate.float()
    for w, w0, a, b, s in zip(weights, pristine, lora_A, lora_B, scalings):
        b_sel = b[idx].float() * (g * s)[:, None, None]                  # (K, out, R)
        a_sel = a[idx].float()                                           # (K, R, in)
        delta = b_sel.permute(1, 0, 2).reshape(b.shape[1], -1) @ a_sel.reshape(-1, a.shape[2])
        w.copy_((w0.float() + delta).to(w.dtype))


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class MergePlan:
    """Packs the weights and LoRA experts of many linears so one launch merges a selection.

    Args:
        weights: the M adapted weights W_m [out_m, in_m] (same dtype and device). Each is
            re-pointed (`.data`) into a flat buffer owned by the plan; hold no other views of them.
        lora_A, lora_B: per matrix [N, R, in_m] and [N, out_m, R]; N and R equal for all m.
        scalings: s_m per matrix (alpha/r).
        pristine: True keeps a copy of W0, snapshotted here (one more W-sized buffer; exact
            restore, no drift; edit weights only through a new plan);
            False is the paper's in-place form
            W <- W - sum_old g' s B A + sum_new g s B A, with no extra memory. Each in-place merge
            rounds once, so after T merges |W_T - (W_0 + Δ_T)| <= T * ulp(max|W|)/2 elementwise
            (random walk, ~sqrt(T) typical; ulp/2 = 2^-8 |W| in bf16, 2^-11 fp16, 2^-24 fp32;
            plus the delta's own error, TF32 on GPU, ~2^-11 |Δ| per add and per subtract),
            and `restore()` subtracts the current selection, leaving that residual: not exact.
        block_m, block_n: tile shape (powers of two >= 16).
        num_warps: warps per program.
        max_programs: persistent-grid size cap (default ``programs_per_sm`` per SM on CUDA, that
            many in all on CPU).
        top_k: K, fixed for the plan's life; None takes it from the first merge.
        stream: evict-first L2 hints on the W0 loads and W stores (each byte is touched once
            per merge; the adapters, re-read by every tile, stay in L2).
        Launch parameters left None come from ``tiles.lookup(device)["merge"]`` (today on every
        GPU: 32x256 tiles, 4 warps, 8 programs/SM; with stream, the best of
        ``benchmark_merge.py --sweep`` on the H100 at the Llama-2-7B shape: 10.9 ms for 12.9 GB
        of weights, 80% of the measured copy bandwidth).
    """

    def __init__(
        self, weights: Sequence[torch.Tensor], lora_A: Sequence[torch.Tensor],
        lora_B: Sequence[torch.Tensor], scalings: Sequence[float], pristine: bool = True,
        block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
        max_programs: int | None = None, top_k: int | None = None, stream: bool = True,
    ) -> None:
        self._check_inputs(weights, lora_A, lora_B, scalings)
        w_first = weights[0]
        self.device, self.dtype = w_first.device, w_first.dtype
        backend.check_device(w_first, "MergePlan")
        self.pristine = pristine
        self.num_experts, self.rank = lora_A[0].shape[0], lora_A[0].shape[1]
        self.rank_padded = pow2_at_least(self.rank, 16)  # tl.dot needs an inner dim >= 16
        self.adapter_dtype = lora_A[0].dtype
        self._params = list(weights)
        self._lora_A, self._lora_B = list(lora_A), list(lora_B)
        shapes = [tuple(w.shape) for w in weights]
        n, rp = self.num_experts, self.rank_padded

        # Flat buffers; every matrix starts on a 16-element boundary (gaps are never touched).
        w_offs, a_offs, b_offs, wt, at, bt = [], [], [], 0, 0, 0
        for out_f, in_f in shapes:
            w_offs.append(wt)
            a_offs.append(at)
            b_offs.append(bt)
            wt += _aligned(out_f * in_f)
            at += _aligned(n * rp * in_f)
            bt += _aligned(n * out_f * rp)
        self._w = torch.empty(wt, dtype=self.dtype, device=self.device)
        for p, off, (out_f, in_f) in zip(self._params, w_offs, shapes):
            view = self._w[off:off + out_f * in_f].view(out_f, in_f)
            view.copy_(p.detach())
            p.data = view  # the Parameter object (and the module holding it) stays the same
        # In place, W0 *is* W: the kernel then reads and writes the same tile, which is safe
        # because each tile belongs to exactly one program.
        self._w0 = self._w.clone() if pristine else self._w
        # Adapters padded with zeros to RP: no rank mask in the kernel, aligned rows.
        self._a = torch.zeros(at, dtype=self.adapter_dtype, device=self.device)
        self._b = torch.zeros(bt, dtype=self.adapter_dtype, device=self.device)
        self._a_views = [self._a[o:o + n * rp * i].view(n, rp, i)
                         for o, (_, i) in zip(a_offs, shapes)]
        self._b_views = [self._b[o:o + n * u * rp].view(n, u, rp)
                         for o, (u, _) in zip(b_offs, shapes)]
        self._pack_adapters()

        self._meta_rows = [[w, a, b, u, i]
                           for w, a, b, (u, i) in zip(w_offs, a_offs, b_offs, shapes)]
        self._scale = torch.tensor([float(s) for s in scalings], dtype=torch.float32,
                                   device=self.device)
        align = _ALIGN
        while align > 1 and any(i % align for _, i in shapes):
            align //= 2
        self._align = align
        self.set_launch_config(block_m, block_n, num_warps, max_programs, stream)

        self.top_k: int | None = None
        if top_k is not None:
            self._alloc_state(top_k)

    @staticmethod
    def _check_inputs(weights, lora_A, lora_B, scalings) -> None:
        m = len(weights)
        if m == 0 or not (len(lora_A) == len(lora_B) == len(scalings) == m):
            raise ValueError(f"need one lora_A, lora_B, scaling per weight; got {m} weights, "
                             f"{len(lora_A)} lora_A, {len(lora_B)} lora_B, "
                             f"{len(scalings)} scalings")
        w0, a0 = weights[0], lora_A[0]
        if w0.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"weight dtype must be one of {_WEIGHT_DTYPES}, got {w0.dtype}")
        if a0.dim() != 3:
            raise ValueError(f"lora_A[0] must be [N, R, in], got shape {tuple(a0.shape)}")
        n, r = a0.shape[0], a0.shape[1]
        ptrs = set()
        for i, (w, a, b) in enumerate(zip(weights, lora_A, lora_B)):
            if w.dim() != 2 or w.numel() == 0:
                raise ValueError(f"weights[{i}] must be a non-empty 2-D matrix, "
                                 f"got {tuple(w.shape)}")
            if w.dtype != w0.dtype or w.device != w0.device:
                raise ValueError(f"weights[{i}] is {w.dtype} on {w.device}; all weights must "
                                 f"share weights[0]'s {w0.dtype} on {w0.device}")
            if w.data_ptr() in ptrs:
                raise ValueError(f"weights[{i}] shares storage with an earlier weight (tied?)")
            ptrs.add(w.data_ptr())
            out_f, in_f = w.shape
            if tuple(a.shape) != (n, r, in_f):
                raise ValueError(f"lora_A[{i}] must be [N={n}, R={r}, in={in_f}] (N and R are "
                                 f"shared by all matrices), got {tuple(a.shape)}")
            if tuple(b.shape) != (n, out_f, r):
                raise ValueError(f"lora_B[{i}] must be [N={n}, out={out_f}, R={r}], "
                                 f"got {tuple(b.shape)}")
            for name, t in (("lora_A", a), ("lora_B", b)):
                if t.dtype != a0.dtype or t.device != w0.device:
                    raise ValueError(f"{name}[{i}] is {t.dtype} on {t.device}; adapters must "
                                     f"all be {a0.dtype} on the weights' device {w0.device}")
        if a0.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"adapter dtype must be one of {_WEIGHT_DTYPES}, got {a0.dtype}")

    def set_launch_config(self, block_m: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None, max_programs: int | None = None,
                          stream: bool = True) -> None:
        """Change tile shape / grid / L2 eviction hints without re-packing (the benchmark sweeps
        these); None: the device's ``tiles.py`` row."""
        cfg = tiles.lookup(self.device)["merge"]
        block_m = cfg["block_m"] if block_m is None else block_m
        block_n = cfg["block_n"] if block_n is None else block_n
        num_warps = cfg["num_warps"] if num_warps is None else num_warps
        for name, v in (("block_m", block_m), ("block_n", block_n)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        self.block_m, self.block_n, self.num_warps, self.stream = block_m, block_n, num_warps, stream
        per_mat = [cdiv(u, block_m) * cdiv(i, block_n)
                 for _, _, _, u, i in self._meta_rows]
        firsts = [0]
        for t in per_mat[:-1]:
            firsts.append(firsts[-1] + t)
        self.num_tiles = sum(per_mat)
        al = self._align
        meta = [[w // al, a // al, b // al, u, i // al, f]
                for (w, a, b, u, i), f in zip(self._meta_rows, firsts)]
        self._meta = torch.tensor(meta, dtype=torch.int64, device=self.device)
        # A tile -> matrix table (4 bytes per tile) beats a per-tile binary search's chain of
        # dependent loads; built once here, never per call.
        counts = torch.tensor(per_mat, dtype=torch.int64)
        self._tile_mat = torch.repeat_interleave(
            torch.arange(len(per_mat), dtype=torch.int32), counts).to(self.device)
        if max_programs is None:  # CPU (interpreter): one SM's worth keeps the interpreted grid small
            sms = backend.sm_count(self.device) if self.device.type == "cuda" else 1
            max_programs = cfg["programs_per_sm"] * sms
        # Persistent grid: few programs, so the per-program arrival atomic never contends.
        self.grid = (max(1, min(self.num_tiles, max_programs)),)

    def _alloc_state(self, k: int) -> None:
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, N={self.num_experts}], got {k}")
        self.top_k = k
        # State: W currently holds round(W0 + merge(prev_idx, prev_gate)); zeros = nothing merged.
        self._prev_idx = torch.zeros(k, dtype=torch.int32, device=self.device)
        self._prev_gate = torch.zeros(k, dtype=torch.float32, device=self.device)
        self._flags = torch.tensor([1, 0, 0], dtype=torch.int32, device=self.device)
        self._zero_idx = torch.zeros(k, dtype=torch.int32, device=self.device)
        self._zero_gate = torch.zeros(k, dtype=torch.float32, device=self.device)

    def _pack_adapters(self) -> None:
        r = self.rank
        for av, bv, a, b in zip(self._a_views, self._b_views, self._lora_A, self._lora_B):
            av[:, :r].copy_(a.detach())
            bv[:, :, :r].copy_(b.detach())

    def _launch(self, idx: torch.Tensor, gate: torch.Tensor, force: bool) -> None:
        k = self.top_k
        _merge_kernel[self.grid](
            self._w, self._w0, self._a, self._b, self._meta, self._scale, self._tile_mat,
            idx, gate, self._prev_idx, self._prev_gate, self._flags,
            self.num_tiles, self.num_experts, int(force),
            K=k, KP=pow2_at_least(k, 1), RP=self.rank_padded, BM=self.block_m, BN=self.block_n,
            ALIGN=self._align, PRISTINE=self.pristine, EVICT="evict_first" if self.stream else "",
            IEEE=self.dtype == torch.float32 and self.adapter_dtype == torch.float32,
            num_warps=self.num_warps,
        )

    def merge(self, idx: torch.Tensor, gate: torch.Tensor, force: bool = False) -> None:
        """Merge experts `idx` [K] (int32/int64) with weights `gate` [K] into all W; one launch.

        No host sync: values stay on the device. If (idx, gate) equal the merged selection the
        kernel returns at once (pass force=True to redo it). Out-of-range indices contribute
        nothing and set a flag that `check_indices()` turns into a ValueError.
        """
        if idx.dim() != 1 or gate.dim() != 1 or idx.numel() != gate.numel():
            raise ValueError(f"idx and gate must be 1-D [K] of equal length, got "
                             f"{tuple(idx.shape)} and {tuple(gate.shape)}")
        if idx.dtype not in (torch.int32, torch.int64) or not gate.dtype.is_floating_point:
            raise ValueError(f"idx must be int32/int64 and gate floating, "
                             f"got {idx.dtype}, {gate.dtype}")
        if idx.device != self.device or gate.device != self.device:
            raise ValueError(f"idx/gate must be on {self.device}, got {idx.device}/{gate.device}")
        if self.top_k is None:
            self._alloc_state(idx.numel())  # the only allocation, on the first call
        elif idx.numel() != self.top_k:
            raise ValueError(f"this plan merges K={self.top_k} experts, got {idx.numel()}")
        self._launch(idx.contiguous(), gate.contiguous(), force)

    def pristine_weights(self) -> list[torch.Tensor]:
        """W0 of every weight (views of the plan's pristine buffer; W itself for pristine=False)."""
        return [self._w0[m[0]: m[0] + m[3] * m[4]].view(m[3], m[4]) for m in self._meta_rows]

    def restore(self) -> None:
        """Put the original weights back: bit-exact when pristine, minus-selection otherwise."""
        if self.pristine:
            self._w.copy_(self._w0)
            if self.top_k is not None:
                self._flags[0] = 0  # W no longer holds the recorded selection: never skip next
        elif self.top_k is not None:
            # W <- W - merged + 0; afterwards the state records "nothing merged" (zeros).
            self._launch(self._zero_idx, self._zero_gate, force=True)

    def refresh_adapters(self) -> None:
        """Re-pack lora_A/lora_B after training changed them (the next merge is never skipped)."""
        if not self.pristine:
            self.restore()  # the merged delta must come out with the adapters that put it in
        self._pack_adapters()
        if self.top_k is not None:
            self._flags[0] = 0

    def check_indices(self) -> None:
        """Raise ValueError if any merge since the last check saw idx outside [0, N). Syncs."""
        if self.top_k is not None and int(self._flags[1].item()) != 0:
            self._flags[1] = 0
            raise ValueError(f"a merge received an expert index outside [0, {self.num_experts}); "
                             f"those experts were left out of the merge")

    @property
    def num_launches_per_merge(self) -> int:
        """Kernel launches per `merge` call: always one, for every matrix and expert."""
        return 1

    @property
    def weight_bytes(self) -> int:
        """Bytes of all merged weights; a merge reads that many (W0) and writes that many (W)."""
        return sum(p.numel() for p in self._params) * self._w.element_size()


def merge_selected_adapters(plan: MergePlan, idx: torch.Tensor, gate: torch.Tensor,
                            force: bool = False) -> None:
    """Functional form of `plan.merge(idx, gate, force)`."""
    plan.merge(idx, gate, force)


backend.require_same_backend(_merge_kernel)  # TRITON_INTERPRET unchanged since backend's import
