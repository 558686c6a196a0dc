"""The adapter registry of ``moelora.serve``: a host cache of adapters and a bounded pool of device slots.

S-LoRA's split (arXiv 2311.03285 §4): every adapter lives in host memory (its state dict, pinned
when the model is on CUDA, so copies to the device are DMA); only the ones that requests use are
copied into the model, into at most ``max_resident`` device *slots* (and at most
``memory_bytes`` of adapter tensors). A slot is one moelora adapter of the model, named
``_slot<k>``; which served adapter it holds changes over time. Residency is LRU; a slot with
in-flight requests (``pins`` > 0) is never evicted.

    reg = AdapterRegistry(model, max_resident=8)
    reg.register_path("math", "adapters/math")           # config + base checked now, tensors lazily
    reg.register_tensors("syn0", cfg, {key: tensor})    # in memory (benchmarks)
    slot = reg.acquire("math")     # resident + pinned: the model adapter name to plan with, or None
    reg.release("math")            # when its request finished / was cancelled
    reg.prefetch("math")           # resident without a pin, if a slot can be had now
    reg.stats()                    # swaps, h2d_bytes, resident, ...

Device side only through moelora's public multi-adapter API: ``add_adapter`` (a new slot, the
adapter's config), ``load_adapter_state_dict`` (host tensors copied into the slot's parameters;
strict keys and shapes), ``delete_adapter`` (a slot dropped). An evicted slot whose config equals
the incoming adapter's is reused: the swap is then only the copy of its tensors (no module
creation), which is why slots are not named after adapters. The model's adapter state stays
owned by ``moelora.state.AdapterState``; this class only decides which adapter sits in which slot.

Not thread-safe by itself: the engine calls it under its admission lock, and passes
``model_lock`` (held for every change of the model, so no forward runs meanwhile).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelora.state import ChangeLog, StackBounds

SLOT_PREFIX = "_slot"


class RegistryError(RuntimeError):
    """An adapter cannot be registered or made resident (its message says why)."""


@dataclass
class HostAdapter:
    name: str
    cfg: object
    path: Path | None = None
    tensors: dict | None = None  # the host cache: None until first needed (lazy)
    nbytes: int = 0  # of ``tensors`` in the model's dtype (known once loaded)
    meta: dict = field(default_factory=dict)  # adapter_config.json of a folder (its checksum)

    @property
    def method(self) -> str:
        return self.cfg.to_dict()["method"]


@dataclass
class Slot:
    model_name: str  # the moelora adapter name of this slot in the model
    key: str  # config key: adapters with equal keys reuse the slot by copying tensors only
    nbytes: int
    adapter: str | None = None  # the served adapter it holds
    pins: int = 0
    last_used: int = 0


@dataclass
class RegistryStats:
    loads: int = 0  # host cache fills (disk -> host)
    swaps: int = 0  # adapters made resident (host -> device)
    reuses: int = 0  # of which into a reused slot (copy only)
    evictions: int = 0
    hits: int = 0  # acquire/prefetch found the adapter resident
    h2d_bytes: int = 0  # adapter bytes copied host -> device slots
    disk_bytes: int = 0
    max_resident: int = 0  # most slots resident at once
    max_resident_bytes: int = 0
    # host seconds (under the model lock except fill_s): where an admission's time goes
    fill_s: float = 0.0  # disk -> host cache
    new_slot_s: float = 0.0  # add_adapter of a new slot (module creation) and its measurement
    install_s: float = 0.0  # host -> slot copies (load_adapter_state_dict; on CUDA: their launch)
    drop_s: float = 0.0  # delete_adapter of evicted slots
    extra: dict = field(default_factory=dict)


def config_key(cfg) -> str:
    """What decides a slot's modules and math: the config without the fields that only record provenance."""
    d = dict(cfg.to_dict())
    for k in ("base_model_name_or_path", "base_model_type"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def _check_base_signature(meta: dict, model, path: Path) -> None:
    """The adapter file's ``base_model`` fields (model_type, hidden size, layers, ...) must match
    the served model's config: an adapter of another base is refused at registration, not at
    its first request."""
    want = meta.get("base_model") or {}
    have = model.config
    wrong = {k: (v, getattr(have, k, None)) for k, v in want.items()
             if v is not None and getattr(have, k, None) is not None and getattr(have, k) != v}
    if wrong:
        desc = ", ".join(f"{k} {a!r} (served model: {b!r})" for k, (a, b) in sorted(wrong.items()))
        raise RegistryError(f"adapter at {str(path)!r} is for another base model: {desc}")


class AdapterRegistry:
    """See the module docstring. ``max_resident``: most slots (None: no count limit);
    ``memory_bytes``: most bytes of resident adapter tensors (None: no byte limit);
    ``pin_memory``: keep the host cache in pinned memory (default: when the model is on CUDA)."""

    def __init__(self, model, *, max_resident: int | None = None, memory_bytes: int | None = None,
                 pin_memory: bool | None = None, model_lock=None) -> None:
        if max_resident is not None and int(max_resident) < 1:
            raise ValueError(f"max_resident_adapters must be >= 1 (or null for no limit), got {max_resident}")
        if memory_bytes is not None and memory_bytes <= 0:
            raise ValueError(f"adapter_memory_gb must be > 0 (or null for no limit), got {memory_bytes / 2**30}")
        self.model = model
        self.max_resident = None if max_resident is None else int(max_resident)
        self.memory_bytes = None if memory_bytes is None else int(memory_bytes)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        self.model_lock = model_lock if model_lock is not None else contextlib.nullcontext()
        self.adapters: dict[str, HostAdapter] = {}
        self.slots: list[Slot] = []
        # the largest (plain-LoRA, MixLoRA expert and router) parts of an adapter (``part_bytes``) the
        # engine's memory plan sized the stacks for (None: no limit); larger adapters are refused
        self.max_part_bytes: tuple[int, int] | None = None
        self._key_bytes: dict[str, int] = {}  # config key -> device bytes of a slot of that config (measured)
        self.stats_ = RegistryStats()
        self._clock = 0
        self._slot_counter = 0
        # a new epoch at every change of the model's adapters (slot added, written, dropped), with
        # what changed: the engine's plans carry both (``BatchPlan.epoch`` / ``changes``), so an
        # adapted module re-checks its stacked adapters only for the slots changed since its last check
        self.changes = ChangeLog()
        self._bounds: StackBounds | None = None  # of the registered adapters (stack_bounds), None: to compute
        # the leading stack positions MixLoRA adapters are kept in (the engine's max_mixlora_per_step), None: all
        self.mixlora_positions: int | None = None

    # ---- host side ------------------------------------------------------------------------------
    def register_path(self, name: str, path: str | os.PathLike, eager: bool = False) -> HostAdapter:
        """An adapter folder (``moelora.save_adapter``) served as ``name``: its config and base
        model are checked now; its tensors are read on first use (``eager``: now)."""
        from moelora import read_adapter_config

        self._check_new(name)
        path = Path(path)
        try:
            cfg, meta = read_adapter_config(path)
        except (ValueError, OSError) as e:
            raise RegistryError(str(e)) from e
        _check_base_signature(meta, self.model, path)
        entry = HostAdapter(name, cfg, path=path, meta=meta)
        if eager:
            self._fill(entry)
        self.adapters[name] = entry
        self._bounds = None
        return entry

    def register_tensors(self, name: str, cfg, tensors: dict) -> HostAdapter:
        """An adapter given in memory (file keys -> tensors, as ``moelora.adapter_state_dict``
        returns). Tensors are kept as given when they already are host tensors of the model's
        dtype (callers may share storage between adapters); otherwise copied."""
        self._check_new(name)
        entry = HostAdapter(name, cfg, tensors=self._to_host(tensors))
        entry.nbytes = _nbytes(entry.tensors)
        self.adapters[name] = entry
        self._bounds = None
        return entry

    def unregister(self, name: str) -> None:
        """Forget ``name`` (its slot, if resident, is dropped). Refused while pinned."""
        slot = self._slot_of(name)
        if slot is not None:
            if slot.pins:
                raise RegistryError(f"adapter {name!r} has {slot.pins} request(s) in flight")
            self._drop(slot)
        self.adapters.pop(name, None)
        self._bounds = None

    def stack_bounds(self) -> StackBounds | None:
        """The largest rank, MixLoRA expert count and top-k among the registered adapters (what
        the engine's plans promise the adapted modules: ``StackBounds``); None when none is registered.
        Registering a larger adapter raises them: the stacks are then built once more at the new sizes."""
        if self.adapters and (self._bounds is None or self._bounds.mixlora_positions != self.mixlora_positions):
            # the methods whose rows the stacks hold (LoRA-Switch and block-diagonal rows run apart)
            cfgs = [a.cfg for a in self.adapters.values() if a.method in ("lora", "mixlora")]
            mix = [c for c in cfgs if c.method == "mixlora"]
            self._bounds = StackBounds(rank=max([int(c.r) for c in cfgs], default=0),
                                       experts=max([int(c.num_experts) for c in mix], default=0),
                                       top_k=max([int(c.top_k) for c in mix], default=0),
                                       expert_rank=max([int(c.r) for c in mix], default=0),
                                       mixlora_positions=self.mixlora_positions)
        return self._bounds

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name or name.startswith(SLOT_PREFIX):
            raise RegistryError(f"adapter names must be non-empty, without '.', not starting with "
                                f"{SLOT_PREFIX!r}; got {name!r}")
        if name in self.adapters:
            raise RegistryError(f"adapter {name!r} is already loaded (unload it first)")

    def _to_host(self, tensors: dict) -> dict:
        """Host copies in the dtype the slot holds: the model's, except routers (moelora keeps
        them float32 in 16-bit models, docs/design.md §2 names them ``router*``), so a swap
        copies no more bytes than the slot has and converts nothing."""
        out = {}
        for k, v in tensors.items():
            t = v.detach()
            want = t.dtype if any(part.startswith("router") for part in k.split(".")) else self.dtype
            if t.device.type != "cpu" or (t.is_floating_point() and t.dtype != want):
                t = t.to("cpu", want if t.is_floating_point() else t.dtype, copy=True)
            if self.pin_memory and not t.is_pinned():
                t = t.pin_memory()  # DMA copies to the device, no staging through pageable memory
            out[k] = t
        return out

    def _fill(self, entry: HostAdapter) -> None:
        """Disk -> host cache, with the file's checksum checked (as ``moelora.load_adapter`` does)."""
        if entry.tensors is not None:
            return
        t0 = time.perf_counter()
        try:
            self._read(entry)
        finally:
            self.stats_.fill_s += time.perf_counter() - t0

    def _read(self, entry: HostAdapter) -> None:
        from safetensors.torch import load_file

        from moelora.io import WEIGHTS_NAME, file_sha256

        weights = entry.path / WEIGHTS_NAME
        try:
            want = entry.meta.get("weights_sha256")
            if want is not None and file_sha256(weights) != want:
                raise RegistryError(f"{str(weights)!r} does not match the checksum in adapter_config.json: "
                                    "the file is corrupted or truncated")
            raw = load_file(str(weights))
        except RegistryError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise RegistryError(f"{str(weights)!r} cannot be read ({type(e).__name__}: {e})") from e
        if not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in raw.values()):
            raise RegistryError(f"{str(weights)!r} holds non-floating-point tensors")
        entry.tensors = self._to_host(raw)
        entry.nbytes = _nbytes(entry.tensors)
        self.stats_.loads += 1
        self.stats_.disk_bytes += entry.nbytes

    # ---- device side ------------------------------------------------------------------------------
    def _slot_of(self, name: str) -> Slot | None:
        for s in self.slots:
            if s.adapter == name:
                return s
        return None

    def known_bytes(self, entry: HostAdapter) -> int:
        """Bytes of ``entry`` in a slot as far as known without reading it: its host tensors, else
        its weights file's size (an upper bound: files of a 16-bit model's adapter may be float32)."""
        if entry.nbytes:
            return entry.nbytes
        if entry.path is not None:
            from moelora.io import WEIGHTS_NAME

            try:
                return (entry.path / WEIGHTS_NAME).stat().st_size
            except OSError:
                return 0
        return 0

    def part_bytes(self, entry: HostAdapter) -> tuple[int, int]:
        """(plain-LoRA bytes, MixLoRA expert and router bytes) of ``entry``: what one stack position
        holds of it in the plain-LoRA stacks and in the expert stacks (``memory.adapter_stack_bytes``).
        Split from its host tensors when loaded; else ``known_bytes`` for each part it may have (an
        upper bound). Methods other than MixLoRA have no expert part."""
        if entry.method != "mixlora":
            return self.known_bytes(entry), 0
        if entry.tensors is None:
            b = self.known_bytes(entry)
            return b, b
        return split_bytes(entry.tensors)

    def _slot_bytes(self, key: str, entry: HostAdapter) -> int:
        """What a slot of config ``key`` takes on the device: measured on the first slot of that
        config (``_measure``), predicted from the host tensors before."""
        return max(self._key_bytes.get(key, 0), entry.nbytes)

    def _measure(self, slot: Slot) -> int:
        """The device bytes of a slot's parameters, each rounded up to the caching allocator's 512-byte blocks."""
        import moelora

        total = 0
        for t in moelora.adapter_state_dict(self.model, slot.model_name).values():
            total += -(-t.numel() * t.element_size() // 512) * 512
        self._key_bytes[slot.key] = total
        return total

    def resident(self) -> list[str]:
        return [s.adapter for s in self.slots if s.adapter is not None]

    def resident_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    def pins(self, name: str) -> int:
        s = self._slot_of(name)
        return 0 if s is None else s.pins

    def acquire(self, name: str, install: bool = True) -> str | None:
        """Make ``name`` resident and pin it: the slot's model adapter name, or None when every
        slot that could take it is pinned (the caller waits and retries); ``install=False``: only
        if it is resident already (no change of the model)."""
        slot = self._make_resident(name) if install else self._slot_of(name)
        if slot is not None and not install:
            self.stats_.hits += 1
            self._touch(slot)
        if slot is None:
            return None
        slot.pins += 1
        return slot.model_name

    def release(self, name: str) -> None:
        s = self._slot_of(name)
        if s is not None and s.pins > 0:
            s.pins -= 1

    def prefetch(self, name: str) -> bool:
        """Make ``name`` resident without pinning it (a request for it is queued), if that needs
        no pinned slot. Never evicts an adapter that itself has requests queued: the caller
        passes only heads of its queue, so it evicts the least recently used of the rest."""
        return self._make_resident(name) is not None

    def fill(self, names) -> list[str]:
        """Make ``names`` resident, in order, while the pool has room for each without evicting
        anything: a warm start (``Engine.warmup``), after which a swap mostly finds an unpinned
        slot of its config to copy into instead of creating a slot's modules under the model lock
        (H200, 7B shape: ~80 ms per new slot, 2.0 of the 2.6 s the lock was held in a 1000-adapter
        run). Returns the names made resident."""
        done = []
        for name in names:
            if name not in self.adapters or self._slot_of(name) is not None:
                continue
            try:
                slot = self._make_resident(name, evict=False)
            except RegistryError:  # too large for the memory plan, or unreadable: its first request says so
                continue
            if slot is None:  # no room left without evicting
                break
            done.append(name)
        return done

    def _touch(self, slot: Slot) -> None:
        self._clock += 1
        slot.last_used = self._clock

    def _make_resident(self, name: str, evict: bool = True) -> Slot | None:
        entry = self.adapters.get(name)
        if entry is None:
            raise RegistryError(f"unknown adapter {name!r}")
        slot = self._slot_of(name)
        if slot is not None:
            self.stats_.hits += 1
            self._touch(slot)
            return slot
        self._fill(entry)
        if self.max_part_bytes is not None:
            for what, knob, have, most in zip(("plain-LoRA", "MixLoRA expert and router"),
                                              ("max_adapter_gb", "max_expert_gb"), self.part_bytes(entry),
                                              self.max_part_bytes):
                if have > most:
                    raise RegistryError(
                        f"adapter {name!r} has {have} bytes of {what} tensors; the engine's memory plan sized its "
                        f"adapter stacks for at most {most} ({knob}={most / 2**30:.3f}); restart with a larger "
                        f"{knob}, or with the adapter served from the start")
        key = config_key(entry.cfg)
        free = sorted((s for s in self.slots if s.pins == 0 and (evict or s.adapter is None)),
                      key=lambda s: (s.adapter is not None, s.last_used))
        # 1) an unpinned slot of the same config (LRU first): a copy, no new modules
        reuse = next((s for s in free if s.key == key), None)
        if reuse is not None:
            self._install(entry, reuse)
            return reuse
        # 2) a new slot, evicting least recently used unpinned slots until the count and bytes fit
        need = self._slot_bytes(key, entry)
        victims, n, b = [], len(self.slots), self.resident_bytes()
        for s in free:
            if self._fits(n + 1, b + need):
                break
            victims.append(s)
            n, b = n - 1, b - s.nbytes
        if not self._fits(n + 1, b + need):
            if self.memory_bytes is not None and need > self.memory_bytes:
                raise RegistryError(f"adapter {name!r} needs {need} bytes; adapter_memory_gb allows "
                                    f"{self.memory_bytes}")
            return None
        for s in victims:
            self._drop(s)
        t0 = time.perf_counter()
        slot = self._new_slot(entry, key)
        if key not in self._key_bytes or self._key_bytes[key] != slot.nbytes:
            slot.nbytes = self._measure(slot)
        self.stats_.new_slot_s += time.perf_counter() - t0
        if not self._fits(len(self.slots), self.resident_bytes()):
            # the slot came out larger than predicted: never over budget, it waits like a pinned pool
            self._drop(slot)
            if self.memory_bytes is not None and slot.nbytes > self.memory_bytes:
                raise RegistryError(f"adapter {name!r} needs {slot.nbytes} bytes on the device; adapter_memory_gb "
                                    f"allows {self.memory_bytes}")
            return None
        self._install(entry, slot)
        return slot

    def _fits(self, n: int, nbytes: int) -> bool:
        return ((self.max_resident is None or n <= self.max_resident)
                and (self.memory_bytes is None or nbytes <= self.memory_bytes))

    @property
    def generation(self) -> int:
        """The current epoch of ``changes`` (a new number at every change of the model's adapters)."""
        return self.changes.epoch

    def _new_slot(self, entry: HostAdapter, key: str) -> Slot:
        import moelora

        name = f"{SLOT_PREFIX}{self._slot_counter}"
        self._slot_counter += 1
        with self.model_lock:
            self.changes.record(name, structural=True)
            moelora.add_adapter(self.model, name, entry.cfg, trainable=False)  # in the model's mode
            if self.model.training:
                self.model.eval()
        slot = Slot(name, key, self._slot_bytes(key, entry))
        self.slots.append(slot)
        return slot

    def _install(self, entry: HostAdapter, slot: Slot) -> None:
        import moelora

        reused = slot.adapter is not None or slot.last_used > 0
        if slot.adapter is not None:
            self.stats_.evictions += 1
        slot.adapter = None  # a failed copy leaves an empty slot, never a half-copied adapter served
        t0 = time.perf_counter()
        with self.model_lock:
            self.changes.record(slot.model_name, structural=False)
            try:
                moelora.load_adapter_state_dict(self.model, entry.tensors, slot.model_name)
            except (KeyError, ValueError, TypeError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else e
                self._drop(slot, locked=True)
                raise RegistryError(f"adapter {entry.name!r} does not fit this model: {msg}") from e
        self.stats_.install_s += time.perf_counter() - t0
        slot.adapter = entry.name
        slot.nbytes = self._slot_bytes(slot.key, entry)  # the device bytes of its config (all slots of a key agree)
        self.stats_.max_resident = max(self.stats_.max_resident, len(self.slots))
        self.stats_.max_resident_bytes = max(self.stats_.max_resident_bytes, self.resident_bytes())
        self.stats_.swaps += 1
        self.stats_.reuses += int(reused)
        self.stats_.h2d_bytes += entry.nbytes
        self._touch(slot)

    def _drop(self, slot: Slot, locked: bool = False) -> None:
        import moelora

        if slot.adapter is not None:
            self.stats_.evictions += 1
        t0 = time.perf_counter()
        with (contextlib.nullcontext() if locked else self.model_lock):
            self.changes.record(slot.model_name, structural=True)
            moelora.delete_adapter(self.model, slot.model_name)
        self.slots.remove(slot)
        self.stats_.drop_s += time.perf_counter() - t0

    def reset_peaks(self) -> None:
        """Start the peak counters again from the current pool (one benchmark run each)."""
        self.stats_.max_resident = len(self.slots)
        self.stats_.max_resident_bytes = self.resident_bytes()

    def clear(self) -> None:
        """Drop every slot (the model is left without the registry's adapters)."""
        for s in list(self.slots):
            self._drop(s)

    def stats(self) -> dict:
        s = self.stats_
        return {"adapters": len(self.adapters), "cached_on_host": sum(a.tensors is not None for a in self.adapters.values()),
                "resident": self.resident(), "resident_slots": len(self.slots), "resident_bytes": self.resident_bytes(),
                "max_resident_adapters": self.max_resident, "adapter_memory_bytes": self.memory_bytes,
                "pinned": {x.adapter: x.pins for x in self.slots if x.pins and x.adapter is not None},
                "loads": s.loads, "swaps": s.swaps, "slot_reuses": s.reuses, "evictions": s.evictions, "hits": s.hits,
                "h2d_bytes": s.h2d_bytes, "disk_bytes": s.disk_bytes, "peak_resident_slots": s.max_resident,
                "peak_resident_bytes": s.max_resident_bytes, "host_pinned_memory": self.pin_memory,
                **{k: round(getattr(s, k), 4) for k in ("fill_s", "new_slot_s", "install_s", "drop_s")}}


def split_bytes(tensors: dict) -> tuple[int, int]:
    """(plain-LoRA, MixLoRA expert and router) bytes of an adapter's tensors (``moelora.adapter_state_dict``
    keys; the expert stacks' are ``...mlp.router.weight`` and ``...mlp.experts.<proj>.lora_A|B``)."""
    expert = _nbytes({k: t for k, t in tensors.items() if any(p in ("experts", "router") for p in k.split("."))})
    return _nbytes(tensors) - expert, expert


def _nbytes(tensors: dict) -> int:
    # shared storages count once per adapter: what a copy into a slot moves
    return sum(t.numel() * t.element_size() for t in tensors.values())


