"""The one owner of a model's adapter state: ``model.moelora_state``.

An ``AdapterState`` holds everything moelora knows about a model besides the adapter tensors
(which are parameters of the adapted modules): the adapters by name with their configs, the
active adapter, the per-forward batch plan (which adapter each sequence uses), the routing
records of the last forward, LoRA-Switch merge state, and what ``remove_adapter`` must undo.

Every adapted module and every hook reaches it through the module it belongs to (a plain
attribute, never a closure), so ``copy.deepcopy(model)`` copies it along with the modules and the
copy is independent. It holds no tensors of its own that ``.to()`` would need to move, except the
LoRA-Switch merge plans, which check their weights before every use (``methods/lora_switch``).
"""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from .layers.router import Routing


_EPOCHS = itertools.count(1)  # ChangeLog epochs: increasing, and unique across logs


class ChangeLog:
    """The adapter changes of a plan maker that alone changes a model's adapters (the serving
    registry), by epoch: every change takes a new epoch (``record``), and ``since(e)`` says which
    adapter names had their tensors written, and which were added or dropped, after epoch ``e``.

    The engine's plans carry the current epoch and this log (``BatchPlan.per_token(...,
    epoch=, changes=)``). An adapted module that checked its cached stacks at epoch ``e`` then
    re-checks only the positions of names changed since (a swap writes one slot): a full check of
    every position's tensors was ~0.2 ms of Python per site (CPU; ~40 ms per 32-layer step on the
    H200 host) at every new epoch. Epochs come from one process-wide counter, so an epoch is
    never reused and any change made after a check has a larger epoch than the check's."""

    def __init__(self, keep: int = 1024) -> None:
        self.epoch = next(_EPOCHS)
        self._keep = keep
        self._entries: collections.deque = collections.deque()  # (epoch, name, structural)
        self._floor = self.epoch  # since() knows every change after this epoch

    def record(self, name: str, structural: bool) -> int:
        """A new epoch for a change of adapter ``name``: its tensors written (``structural``
        False) or the adapter added / dropped (True). Call it before the change, under the lock
        that keeps forwards out."""
        self.epoch = next(_EPOCHS)
        self._entries.append((self.epoch, name, structural))
        while len(self._entries) > self._keep:
            self._floor = self._entries.popleft()[0]
        return self.epoch

    def since(self, epoch) -> tuple[frozenset, frozenset] | None:
        """(names written, names added or dropped) after ``epoch``; None when not known (an
        epoch older than the log keeps, or not an epoch)."""
        if not isinstance(epoch, int) or epoch < self._floor:
            return None
        written, structural = set(), set()
        for e, name, struct in reversed(self._entries):
            if e <= epoch:
                break
            (structural if struct else written).add(name)
        return frozenset(written), frozenset(structural)


@dataclass(frozen=True)
class StackBounds:
    """Sizes that a plan's maker promises no adapter of its plans exceeds: the largest rank of the
    LoRA linears (LoRA adapters', MixLoRA's attention LoRA), and of MixLoRA's experts (apart: a
    MixLoRA stack holds E experts per position, so a rank-64 LoRA must not size them), MixLoRA
    expert count and top-k. A plan carrying them
    (``BatchPlan.per_token(bounds=...)``: the serving engine's, from every adapter it serves) has
    its stacked adapters built at these sizes, so a later composition is written into the same
    tensors in place (``adapted._cached_per_site``) and the CUDA graphs that read them stay valid:
    without bounds a newcomer of a larger rank rebuilt every site's stacks at new addresses, and
    each serving-step graph was captured again (3-4 s per token bucket on the H200, 7B shape)."""
    rank: int
    experts: int = 0
    top_k: int = 0
    expert_rank: int = 0
    # the MixLoRA expert stacks cover only the plan's first ``mixlora_positions`` positions (the
    # serving engine keeps every MixLoRA adapter there: ``Engine(max_mixlora_per_step=...)``), so a
    # position of a plain LoRA adapter reserves no E x expert-rank rows; None: every position
    mixlora_positions: int | None = None


@dataclass
class LayerRouting:
    """What one routed layer decided in the last forward (kept for the aux loss and analysis)."""

    layer: int
    routing: Routing
    token_mask: torch.Tensor | None  # (N,) bool, True = real token
    num_experts: int

    def __deepcopy__(self, memo: dict) -> "LayerRouting":
        # After a training forward these tensors belong to its autograd graph (non-leaf), which
        # deepcopy refuses: a copied model gets their values; the graph stays with the original.
        def value(t):
            return None if t is None else t.detach().clone()

        return LayerRouting(self.layer, Routing(*(value(t) for t in self.routing)), value(self.token_mask),
                            self.num_experts)


@dataclass
class AdapterInfo:
    """One adapter of the model: its (private copy of the) config and whether it trains."""

    name: str
    config: Any
    trainable: bool = True
    # The adapter's own dropout stream (``AdapterState.seed_dropout``); None = torch's global RNG.
    # With its own stream an adapter draws the same masks alone and in a batch shared with other
    # adapters (concurrent training: each job's numbers must not depend on the others).
    dropout_generator: torch.Generator | None = None

    @property
    def method(self) -> str:
        return self.config.method


_MISSING = object()  # BatchPlan.memo: not made yet (None is a result)


class BatchPlan:
    """Which adapter each sequence of the current forward uses, decided once per forward.

    ``name``: the adapter of every row when the batch is uniform (None: the base model).
    ``mixed``: rows use different adapters; then ``slot_names`` lists the distinct names (None =
    base) and ``row_slots`` (B,) maps each row to its slot. ``token_slots(B, T)`` expands that to
    the (B*T,) per-token index that every adapted module of this forward shares."""

    __slots__ = ("name", "mixed", "row_names", "slot_names", "row_slots", "_tok", "packed", "lengths", "_seg", "_maps",
                 "epoch", "changes", "graph_step", "bounds", "_memo")

    def __init__(self, name: str | None = None, row_names: tuple | None = None, device=None,
                 row_slots: torch.Tensor | None = None) -> None:
        self.name = name
        self.row_names = row_names
        self.mixed = row_names is not None
        self._tok: tuple | None = None
        self._seg: tuple | None = None
        self._maps: dict = {}
        self.packed = False
        # None, or a promise of the plan's maker (the serving engine: its registry's generation)
        # that no adapter tensor of the model changed since an earlier plan of the same epoch: the
        # adapted modules then reuse what they checked in that epoch (``adapted._slot_memo``)
        self.epoch = None
        self.changes: ChangeLog | None = None  # the epoch's maker's log (``changes_since``)
        self._memo: dict = {}  # see ``memo``
        # True only from a maker whose forwards consume every adapted module's output within the
        # step (the serving engine: a paged KV cache copies keys/values in): then a mixed step of
        # few tokens may replay CUDA graphs of padded token buckets (``decode_graphs.step_applies``)
        self.graph_step = False
        self.bounds: StackBounds | None = None  # see StackBounds (None: stacks sized by their adapters)
        # Per slot, the sequence length its rows had in their own (right-padded) batch before they
        # were padded to this batch's length, or None; set by concurrent training so that an
        # adapter's dropout masks have the shape they have when it runs alone (``AdapterState.dropout``).
        self.lengths: tuple | None = None
        if self.mixed:
            self.slot_names = tuple(dict.fromkeys(row_names))
            slot = {n: i for i, n in enumerate(self.slot_names)}
            self.row_slots = (row_slots if row_slots is not None
                              else torch.tensor([slot[n] for n in row_names], dtype=torch.long, device=device))
        else:
            self.slot_names = (name,)
            self.row_slots = None

    @classmethod
    def per_token(cls, slot_names, token_slots: torch.Tensor, epoch=None, changes: ChangeLog | None = None,
                  graph_step: bool = False, bounds: StackBounds | None = None) -> "BatchPlan":
        """A mixed plan for a packed batch (continuous batching: every request's tokens flattened
        into one sequence): ``token_slots`` (N,) gives each token's index into ``slot_names``
        (None = base). The N tokens are the plan's rows, one token each, so every adapted module
        reads them through ``token_slots(N, 1)`` like any mixed batch (or ``token_slots(1, N)``: the
        packed sequence as the model sees it, e.g. LoRA-Switch's layer-0 router). Pass it as
        ``adapter_names=plan`` to the forward (``AdapterState.resolve_names`` returns it as is).
        ``epoch``: see ``__init__`` (only a caller that alone changes the model's adapters, and
        takes a new epoch at every change, may give one); ``changes``: that caller's
        ``ChangeLog``, whose current epoch ``epoch`` is. ``graph_step``: see ``__init__`` (a caller
        whose model consumes every module's output within the forward: the serving engine);
        ``bounds``: ``StackBounds`` of every adapter the caller may put in its plans."""
        plan = cls.__new__(cls)
        plan.graph_step = bool(graph_step)
        plan.bounds = bounds
        plan.epoch = epoch
        plan.changes = changes
        plan._memo = {}
        plan.name = None
        plan.row_names = None
        plan.mixed = True
        plan._tok = None
        plan._seg = None
        plan._maps = {}
        plan.packed = True
        plan.lengths = None
        plan.slot_names = tuple(slot_names)
        plan.row_slots = token_slots.reshape(-1).long()
        return plan

    def changes_since(self, epoch) -> tuple[frozenset, frozenset] | None:
        """``ChangeLog.since(epoch)`` of the plan's log (None without one), once per plan and
        epoch: every adapted module of the forward asks with the epoch it last checked at."""
        if self.changes is None or epoch is None:
            return None
        return self.memo(("changes_since", epoch), lambda: self.changes.since(epoch))

    def memo(self, key, make):
        """``make()`` once per plan and ``key`` (None results too): what every adapted module of
        the forward derives from the plan alone (the changes since an epoch, the gathered
        kernel's slot order of the per-token slots: one sort per serving step, not one per linear)."""
        hit = self._memo.get(key, _MISSING)
        if hit is _MISSING:
            hit = self._memo[key] = make()
        return hit

    def touched_positions(self, epoch) -> tuple | None:
        """Positions of ``slot_names`` whose adapters were written, added or dropped after
        ``epoch`` (``changes_since``), once per plan and epoch; None when not known."""
        def make():
            ch = self.changes_since(epoch)
            return None if ch is None else tuple(i for i, n in enumerate(self.slot_names) if n in ch[0] or n in ch[1])

        return self.memo(("positions", epoch), make)

    def token_slots(self, batch: int, seq: int) -> torch.Tensor:
        """(batch*seq,) slot of every token (computed once per forward and shape)."""
        c = self._tok
        if c is not None and c[0] == (batch, seq):
            return c[1]
        if self.packed and batch * seq == self.row_slots.shape[0]:
            return self.row_slots  # the packed tokens, in order, whichever way they are shaped
        if self.row_slots.shape[0] != batch:
            raise ValueError(f"adapter_names has {self.row_slots.shape[0]} entries but the batch has {batch} rows")
        tok = self.row_slots.repeat_interleave(seq)
        self._tok = ((batch, seq), tok)
        return tok

    def segments(self, batch: int, seq: int) -> tuple[torch.Tensor, list[int]]:
        """``(idx, counts)``: idx (S, n_max) holds each slot's token indices (into the flattened
        batch*seq tokens) in order, padded with ``batch*seq`` (a zero row the caller appends);
        counts[s] = slot s's tokens. What the gathered training forms index each adapter's own
        tokens with (no token of another adapter ever enters its GEMMs). Built once per forward and
        shape, on the host from the row names (no device sync)."""
        c = self._seg
        if c is not None and c[0] == (batch, seq):
            return c[1]
        if self.row_names is not None and len(self.row_names) == batch:
            pos = torch.arange(seq)
            per = [(torch.tensor([r for r, n in enumerate(self.row_names) if n == name])[:, None] * seq
                    + pos[None]).reshape(-1) for name in self.slot_names]
        else:  # a packed plan: the slots are per token (one host read of them)
            tok = self.token_slots(batch, seq).cpu()
            per = [torch.nonzero(tok == s, as_tuple=True)[0] for s in range(len(self.slot_names))]
        counts = [int(p.numel()) for p in per]
        n_max = max(counts)
        idx = torch.full((len(per), n_max), batch * seq, dtype=torch.long)
        for s, p in enumerate(per):
            idx[s, : counts[s]] = p
        out = (idx.to(self.row_slots.device), counts)
        self._seg = ((batch, seq), out, idx)
        return out

    def segment_maps(self, batch: int, seq: int, slots: tuple[int, ...]) -> dict:
        """Index maps of the tokens of ``slots`` (the adapters present at a site), built once per
        forward, shape and slot set on the host from ``segments`` and moved in ONE host-to-device
        copy (each copy from pageable memory waits for the GPU queue):

        - ``sel`` (P, n): each slot's token indices (into the batch*seq tokens), padded with
          batch*seq; ``inv`` (batch*seq,): the position of each token in ``sel.reshape(-1)``, P*n
          for tokens of no slot here. A gathered form adds its per-slot results back with
          ``cat([out.reshape(P*n, ...), zero row])[inv]``: a gather saves only its index for
          backward, where ``index_add_`` would keep the whole (P, n, ...) source alive;
        - the sub-batch of these slots' tokens, slot after slot: ``rows`` (M,) its tokens,
          ``counts``/``offsets`` (host ints: slot p is rows offsets[p]:offsets[p]+counts[p]),
          ``tok`` (M,) the local slot 0..P-1 of each, ``local_sel`` (P, n) / ``local_inv`` (M,) as
          sel/inv within the sub-batch, ``order`` (batch*seq,): where each token sits in
          ``cat([sub-batch, the other tokens])``, to put the sub-batch's results back in place;
          ``other``: those other tokens, in order; ``perm`` = cat([rows, other]) (the inverse of
          ``order``), ``rows_inv`` / ``other_inv`` (batch*seq,): each token's position in ``rows`` /
          ``other`` (M / batch*seq - M where it is not in it): the inverse maps of those selections."""
        key = (batch, seq, tuple(slots))
        hit = self._maps.get(key)
        if hit is not None:
            return hit
        self.segments(batch, seq)
        host = self._seg[2]
        counts_all = self._seg[1][1]
        N, P = batch * seq, len(slots)
        counts = [counts_all[s] for s in slots]
        n = max(max(counts), 1)
        sel = host[list(slots), :n]
        flat = sel.reshape(-1)
        real = flat < N
        inv = torch.full((N + 1,), P * n, dtype=torch.long)
        inv[flat[real]] = torch.arange(P * n)[real]
        rows = torch.cat([host[s, : c] for s, c in zip(slots, counts)])
        M = int(rows.numel())
        offsets = [sum(counts[:p]) for p in range(P)]
        j = torch.arange(n)
        local_sel = torch.where(j[None] < torch.tensor(counts)[:, None], torch.tensor(offsets)[:, None] + j[None],
                                torch.full((P, n), M))
        local_inv = torch.cat([p * n + torch.arange(c) for p, c in enumerate(counts)])
        tok = torch.cat([torch.full((c,), p) for p, c in enumerate(counts)])
        other = torch.ones(N, dtype=torch.bool)
        other[rows] = False
        rest = torch.nonzero(other, as_tuple=True)[0]
        perm = torch.cat([rows, rest])
        order = torch.empty(N, dtype=torch.long)
        order[perm] = torch.arange(N)
        # the inverses of the row selections (adapted._RowGather's backward): where each token sits
        # in ``rows`` / ``other`` (M / N-M: not there)
        rows_inv = torch.where(order < M, order, M)
        other_inv = torch.where(order >= M, order - M, N - M)
        # where each slot's dropout mask, drawn as dropout_draw draws it ((rows, own) when the
        # slot's own length is shorter, else (count,)), lands in the (P, n) layout of ``sel``: rows
        # of cat([every slot's draw as (-1, d), one all-true row]) (adapted._stacked_keeps)
        keep_rows, pieces, off = [], [], 0
        for p, (s, c) in enumerate(zip(slots, counts)):
            own = self.own_length(s, seq) if c else None
            i = torch.arange(c)
            if own is None:
                pieces.append(off + i)
                keep_rows.append(c)
            else:
                r, t = i // seq, i % seq
                pieces.append(torch.where(t < own, off + r * own + t, -1))
                keep_rows.append((c // seq) * own)
            off += keep_rows[-1]
        keep_index = torch.full((P, n), off, dtype=torch.long)
        for p, piece in enumerate(pieces):
            keep_index[p, : piece.numel()] = torch.where(piece >= 0, piece, off)
        parts = {"sel": sel, "inv": inv[:N], "rows": rows, "tok": tok, "local_sel": local_sel,
                 "local_inv": local_inv, "order": order, "other": rest, "perm": perm, "rows_inv": rows_inv,
                 "other_inv": other_inv, "keep_index": keep_index}
        dev = torch.cat([t.reshape(-1) for t in parts.values()]).to(self.row_slots.device)  # one copy
        out, at = {}, 0
        for k, t in parts.items():
            out[k] = dev[at: at + t.numel()].view(t.shape)
            at += t.numel()
        out.update(counts=counts, offsets=offsets, n_sub=M, n_other=N - M, keep_rows=keep_rows)
        self._maps[key] = out
        return out

    def own_length(self, slot: int, seq: int) -> int | None:
        """Slot ``slot``'s own row length when this (mixed, unpacked) plan knows it and it is
        shorter than the batch's ``seq``, else None: where an adapter's dropout masks are drawn
        as its batch alone draws them (``AdapterState.dropout_draw``)."""
        if not self.mixed or self.packed or self.lengths is None:
            return None
        own = self.lengths[slot]
        return own if own is not None and own < seq else None

    def rows_of(self, slot: int, batch: int, seq: int) -> torch.Tensor:
        """Token indices (into the flattened batch*seq tokens) that use ``slot_names[slot]``."""
        return torch.nonzero(self.token_slots(batch, seq) == slot, as_tuple=True)[0]

    def names(self) -> tuple:
        """The adapters this forward uses (None included when some rows run the base)."""
        return self.slot_names


@dataclass
class AdapterState:
    """See the module docstring. One per adapted model, reachable as ``model.moelora_state``."""

    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    active: str | None = None
    # what remove_adapter undoes: (parent, attr, original module or None for a module we added)
    originals: list = field(default_factory=list)
    handles: list = field(default_factory=list)  # hook handles of the model-level hooks
    disabled: bool = False  # inside moelora.disable_adapter: the base modules run
    merged_lora: str | None = None  # the LoRA adapter moelora.merge_lora folded into the base weights
    switch_hook: Any = None  # handle of LoRA-Switch's layer-0 routing hook (while one is present)
    # ---- per-forward state, reset by the decoder-stack pre-hook of every forward ----
    plan: BatchPlan = field(default_factory=BatchPlan)
    attention_mask: torch.Tensor | None = None
    has_labels: bool = False
    past_tokens: int = 0  # tokens already in the forward's dynamic KV cache (0: prefill or unknown)
    in_forward: bool = False
    pending_names: Any = None  # adapter_names of the top-level call, consumed by its decoder forward
    generation_names: Any = None  # adapter_names of the model.generate call in progress
    # generate(cache_implementation="static")'s one reused StaticCache: (key, length, cache)
    # (``_private.ReusedStaticCache``); hand_out_cache: this call returns its cache to the caller
    generation_cache: Any = field(default=None, repr=False)
    hand_out_cache: bool = False
    records: dict[str | None, dict[int, LayerRouting]] = field(default_factory=dict)
    switch: dict[str, Any] = field(default_factory=dict)  # LoRA-Switch per-adapter SwitchState
    _mask_cache: tuple | None = field(default=None, repr=False)
    _static_slots: dict = field(default_factory=dict, repr=False)  # (B, T, device) -> [buffer, plan it holds]
    _row_slots: dict = field(default_factory=dict, repr=False)  # (row slot pattern, device) -> (B,) tensor

    # ---- the batch plan -------------------------------------------------------------------
    def resolve_names(self, names, batch: int | None, device=None) -> BatchPlan:
        """A BatchPlan from ``adapter_names`` (a list per row, one name for all, or None = active;
        a ``BatchPlan`` itself, e.g. ``BatchPlan.per_token``, is used as given after a name check)."""
        if names is None:
            return BatchPlan(self.active)
        if isinstance(names, BatchPlan):
            for n in names.slot_names:
                if n is not None:
                    self._check_known(n)
            return names
        if isinstance(names, str):
            self._check_known(names)
            return BatchPlan(names)
        names = tuple(names)
        for n in names:
            if n is not None:
                self._check_known(n)
        if batch is not None and len(names) != batch:
            if len(names) and batch % len(names) == 0:  # generate's num_return_sequences / beams
                rep = batch // len(names)
                names = tuple(n for n in names for _ in range(rep))
            else:
                raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch} sequences; "
                                 "give one name (or None for the base model) per sequence")
        if len(set(names)) == 1:
            return BatchPlan(names[0])
        return BatchPlan(None, names, device, self._row_slot_tensor(names, device))

    def _row_slot_tensor(self, row_names: tuple, device) -> torch.Tensor:
        """The (B,) slot of each row of a mixed batch: one tensor per row pattern and device, made
        once. Why: under torch.compile (``generate`` with a static cache) a tensor built from a Python
        list becomes a CPU constant copied to the GPU inside the graph, and Inductor then runs the
        graph without CUDA graphs; a cached tensor enters it as an input instead (the uncompiled
        prefill of the same ``generate`` call makes it)."""
        first = {n: i for i, n in enumerate(dict.fromkeys(row_names))}
        key = (tuple(first[n] for n in row_names), str(device))
        t = self._row_slots.get(key)
        if t is None:
            if len(self._row_slots) >= 64:  # bounded: serving sees many batch compositions
                self._row_slots.pop(next(iter(self._row_slots)))
            t = self._row_slots[key] = torch.tensor(key[0], dtype=torch.long, device=device)
        return t

    # ---- per-adapter dropout streams ---------------------------------------------------------
    def seed_dropout(self, name: str, seed: int | None, device=None) -> None:
        """Give adapter ``name`` its own dropout generator seeded with ``seed`` (None: back to
        torch's global RNG). ``device``: where its masks are drawn (the adapter's device)."""
        self._check_known(name)
        if seed is None:
            self.adapters[name].dropout_generator = None
            return
        gen = torch.Generator(device=device or "cpu")
        gen.manual_seed(int(seed))
        self.adapters[name].dropout_generator = gen

    def dropout(self, name: str | None, x: torch.Tensor, p: float) -> torch.Tensor:
        """Training dropout of adapter ``name``'s input ``x``: tokens first, (tokens, ...) or
        (B, T, ...), holding exactly this forward's tokens of ``name`` (all of them in a uniform
        batch, its rows' tokens in order in a mixed one).

        With its own generator, the mask is drawn in the layout of the adapter's own batch: in a
        mixed batch whose plan knows the rows' own length (``BatchPlan.lengths``), a
        (rows, own length, ...) mask padded to this batch's length, so the numbers drawn equal
        those of the adapter's batch run alone (padding positions get no dropout: they are masked)."""
        keep = self.dropout_keep(name, tuple(x.shape), torch.bool, x.device, p)
        if keep is None:
            return torch.nn.functional.dropout(x, p, training=True)
        return x * keep * (1.0 / (1.0 - p))  # x * bool: x's dtype, exactly x or 0

    def dropout_keep(self, name: str | None, shape: tuple, dtype, device, p: float) -> torch.Tensor | None:
        """The 0/1 keep mask (``shape``, ``dtype``) that ``dropout`` multiplies an input of that
        shape with, drawn from adapter ``name``'s own stream; None when it has none (torch's
        global RNG). The mixed-batch training forms draw every adapter's mask with it and apply
        them all in one multiply (``x * (keep * 1/(1-p))`` rounds as ``x * keep * 1/(1-p)``:
        keep is exactly 0 or 1). Always drawn as a bool tensor, then converted to ``dtype``: one
        draw for every path, solo and mixed, whatever dtype each needs (and a quarter of a float32
        draw's memory traffic)."""
        drawn = self.dropout_draw(name, shape, device, p)
        if drawn is None:
            return None
        keep, seq = drawn
        if seq is not None:  # ones after each row's own length: one contiguous cat (a pad of the moved
            # dimension was a strided copy per adapter and linear, slow on a GPU)
            rows, own = keep.shape[0], keep.shape[1]
            keep = torch.cat([keep, keep.new_ones((rows, seq - own) + tuple(keep.shape[2:]))], dim=1).reshape(shape)
        return keep if dtype == torch.bool else keep.to(dtype)

    def dropout_draw(self, name: str | None, shape: tuple, device, p: float) -> tuple[torch.Tensor, int | None] | None:
        """What ``dropout_keep`` draws, before it is laid out in ``shape``: (keep, None), the bool
        mask of ``shape``; or, in a mixed batch whose plan knows adapter ``name``'s own row length
        (shorter than this batch's ``seq``), (keep (rows, own, ...), seq): the positions past each
        row's own length keep everything. None when ``name`` has no own stream. A gathered form
        that stacks several adapters' masks lays the raw draws out itself (one gather for all)."""
        info = self.adapters.get(name) if name is not None else None
        gen = None if info is None else info.dropout_generator
        if gen is None:
            return None
        plan = self.plan if self.in_forward else None
        shape = tuple(shape)
        draw, seq = shape, None
        if plan is not None and plan.mixed and not plan.packed and plan.lengths is not None:
            rows = plan.row_names.count(name)
            own = plan.own_length(plan.slot_names.index(name), shape[0] // rows)
            if own is not None:
                draw, seq = (rows, own) + shape[1:], shape[0] // rows
        if gen.device == torch.device(device):
            keep = torch.empty(draw, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=gen)
        else:  # the model moved (.to()) after seed_dropout: a generator cannot move, so draw where it is
            keep = torch.empty(draw, dtype=torch.bool, device=gen.device).bernoulli_(1.0 - p, generator=gen).to(device)
        return keep, seq

    def _check_known(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}; this model has {sorted(self.adapters)} "
                           "(moelora.list_adapters(model) lists them, None selects the base model)")

    def begin_forward(self, plan: BatchPlan, attention_mask, past_tokens: int) -> None:
        self.plan = plan
        self.attention_mask = attention_mask
        self._mask_cache = None
        self.past_tokens = past_tokens
        self.in_forward = True
        self.records = {}

    def end_forward(self) -> None:
        """Forget what only held for the forward that ended (a direct call of an inner module
        afterwards sees the active adapter and no mask, never a stale one)."""
        self.plan = BatchPlan(self.active)
        self.attention_mask = None
        self._mask_cache = None
        self.past_tokens = 0
        self.in_forward = False

    def current_plan(self) -> BatchPlan:
        return self.plan if self.in_forward else BatchPlan(self.active)

    # ---- what the layers read --------------------------------------------------------------
    def token_mask_for(self, batch: int, seq: int) -> torch.Tensor | None:
        """(batch*seq,) bool mask of the current tokens, or None when there is no padding info.

        During cached decoding the mask covers past + new tokens; the new ones are the last `seq`.
        Computed once per forward (three launches), not once per routed layer."""
        am = self.attention_mask
        if am is None or am.dim() != 2 or am.shape[0] != batch or am.shape[1] < seq:
            return None
        c = self._mask_cache
        if c is not None and c[0] is am and c[1] == (batch, seq):
            return c[2]
        mask = am[:, am.shape[1] - seq:].reshape(-1).bool()
        self._mask_cache = (am, (batch, seq), mask)
        return mask

    def static_token_slots(self, batch: int, seq: int) -> torch.Tensor:
        """The current plan's per-token slots in a buffer whose address never changes for this
        shape (read by the mixed-batch decode graphs); written once per forward."""
        tok = self.plan.token_slots(batch, seq)
        key = (batch, seq, tok.device)
        entry = self._static_slots.get(key)
        if entry is None:
            entry = self._static_slots[key] = [torch.empty_like(tok), None]
        if entry[1] is not self.plan:
            entry[0].copy_(tok)
            entry[1] = self.plan
        return entry[0]

    def padded_token_slots(self, n_pad: int) -> torch.Tensor:
        """The current packed plan's per-token slots padded with slot 0 to ``n_pad`` tokens, in a
        buffer whose address never changes for ``n_pad`` (read by the serving steps' graphs of
        padded token buckets: the padding rows' inputs are zeros and their outputs dropped, so
        any valid slot serves); written once per forward."""
        tok = self.plan.token_slots(self.plan.row_slots.shape[0], 1)
        key = ("padded", n_pad, tok.device)
        entry = self._static_slots.get(key)
        if entry is None:
            entry = self._static_slots[key] = [tok.new_zeros(n_pad), None]
        if entry[1] is not self.plan:
            n = tok.shape[0]
            entry[0][:n].copy_(tok)
            entry[0][n:].zero_()
            entry[1] = self.plan
        return entry[0]

    def cached_decode_step(self) -> bool:
        """Whether this forward decodes on top of cached tokens (``past_tokens > 0``). The eager
        decode graphs (``decode_graphs``) apply only then, never to a prefill, whose outputs a KV
        cache may keep by reference."""
        return self.past_tokens > 0

    def record(self, adapter: str | None, layer: int, routing: Routing, token_mask, num_experts: int) -> None:
        if torch.compiler.is_compiling() and not (torch.is_grad_enabled() or self.has_labels):
            # Compiled inference keeps no routing records (router_statistics() stays empty): under
            # CUDA graphs (mode="reduce-overhead", HF's static cache) the routing tensors are graph
            # outputs that the next replay overwrites, so a record kept past its step would be
            # stale, and live outputs constrain how cudagraph trees may replay.
            return
        self.record_entry(adapter, LayerRouting(layer, routing, token_mask, num_experts))

    def record_entry(self, adapter: str | None, entry) -> None:
        """Keep ``entry`` (a ``LayerRouting``, or an object with its attributes whose ``routing`` /
        ``token_mask`` are computed on first read: the mixed inference mixture's) for ``entry.layer``."""
        if not self.in_forward:
            self.records = {}  # an inner module called on its own: its records only
        self.records.setdefault(adapter, {})[entry.layer] = entry

    def detach_records(self) -> None:
        """Keep the last forward's routing records as values, not as parts of its autograd graph,
        once the top-level forward has taken the aux loss from them (``hooks.top_post``). A record
        holding graph tensors kept that graph alive until the next forward, and with it a cycle
        no garbage collector can break (record -> graph -> a recomputing node's ctx -> the FFN ->
        this state -> record): a deleted MixLoRA model left its base's weights on the GPU (H200,
        7B shape: 13.8 GB per model)."""
        for recs in self.records.values():
            for layer, r in recs.items():
                if isinstance(r, LayerRouting) and any(isinstance(t, torch.Tensor) and t.grad_fn is not None
                                                       for t in r.routing):
                    recs[layer] = LayerRouting(r.layer, Routing(*(None if t is None else t.detach() for t in r.routing)),
                                               r.token_mask, r.num_experts)

    def end_compiled_step(self) -> None:
        """Drop step-local tensors held on Python objects (see ``record``); compiled inference only."""
        for st in self.switch.values():
            st.experts = st.weights = st.rows = None
