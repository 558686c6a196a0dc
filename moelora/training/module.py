"""LightningModule that fine-tunes a moelora adapter on a frozen Hugging Face causal LM.

Loss: the HF output's ``.loss`` = masked CE (the collator sets prompt and padding labels to -100)
plus the router load-balance loss that ``moelora.inject_adapter`` adds. Checkpoints hold the
adapter tensors, optimizer/scheduler state and the RNG state only (never the frozen base), so a
resumed run continues bit-for-bit where the killed one stopped.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric

import moelora
from moelora.layers.dispatch import compiled_expert_hidden, plain_mixture_backward
from moelora.training.checkpoint import BASE_KEY, base_signature

# Prefix of the adapter keys in Lightning's checkpoint["state_dict"] (the module's attribute name).
_KEY_PREFIX = "model."


def check_same_adapter(checkpoint: Mapping[str, Any], model: nn.Module) -> None:
    """Raise ValueError if ``checkpoint`` was trained with another adapter config than ``model``'s."""
    saved = checkpoint.get("moelora_adapter_config")
    current = moelora.get_adapter_config(model).to_dict()
    if saved is None or saved == current:
        return
    if not isinstance(saved, Mapping):
        raise ValueError(f"the checkpoint's moelora_adapter_config is {type(saved).__name__}, not a mapping")
    diff = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)}
    raise ValueError(
        "the checkpoint was trained with a different adapter config: "
        + ", ".join(f"{k}={a!r} in the checkpoint but {b!r} now" for k, (a, b) in diff.items())
    )


def attach_adapter(model: nn.Module, adapter_cfg: Any, adapter_name: str, seed: int | None) -> nn.Module:
    """Add ``adapter_cfg`` to ``model`` as ``adapter_name`` (injecting when the model has no
    adapter yet), its initial weights drawn from ``seed`` alone and its dropout from its own
    stream seeded with ``seed``.

    Why seeded here and not by the run's global seed: the global RNG state after building the base
    depends on how the base was built and, in concurrent training, on the jobs added before; seeding
    the adapter itself makes a job start, and draw its dropout masks, the same alone and beside other
    jobs (``moelora.training.concurrent``). The global RNG is left as it was."""
    state = moelora.adapter_state(model)
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(int(seed))
        if state is None or not state.adapters:
            model = moelora.inject_adapter(model, adapter_cfg, adapter_name=adapter_name)
        else:
            moelora.add_adapter(model, adapter_name, adapter_cfg)
    device = next((p.device for n, p in model.named_parameters() if f"adapters.{adapter_name}." in n), None)
    moelora.adapter_state(model).seed_dropout(adapter_name, seed, device=device)
    return model


def router_log_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, float]:
    """Per routed layer of ``adapter_name`` (last forward): expert load fractions, load CV and
    routing entropy, as the ``router/...`` metrics a run logs; empty for plain LoRA."""
    stats = moelora.router_statistics(model, adapter_name)
    if not stats:
        return {}
    logs: dict[str, float] = {}
    for s in stats:
        layer = f"router/layer{s['layer']:02d}"
        logs[f"{layer}/load_cv"] = float(s["load_cv"])
        logs[f"{layer}/entropy"] = float(s["entropy"])
        logs[f"{layer}/experts_per_token"] = float(s["experts_per_token"])
        for e, frac in enumerate(s["load"].tolist()):
            logs[f"{layer}/load_e{e}"] = frac
    logs["router/load_cv"] = sum(float(s["load_cv"]) for s in stats) / len(stats)
    logs["router/entropy"] = sum(float(s["entropy"]) for s in stats) / len(stats)
    logs["router/experts_per_token"] = sum(float(s["experts_per_token"]) for s in stats) / len(stats)
    return logs


def dropout_rng_states(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of every adapter's own dropout stream (``attach_adapter``), for checkpoints."""
    state = moelora.adapter_state(model)
    if state is None:
        return {}
    return {n: i.dropout_generator.get_state() for n, i in state.adapters.items() if i.dropout_generator is not None}


def set_dropout_rng_states(model: nn.Module, states: Mapping[str, torch.Tensor]) -> None:
    state = moelora.adapter_state(model)
    for name, st in states.items():
        info = None if state is None else state.adapters.get(name)
        if info is not None and info.dropout_generator is not None:
            info.dropout_generator.set_state(st)


def _metric_key(task: str) -> str:
    """nn.ModuleDict keys cannot contain dots."""
    return task.replace(".", "_")


class MoeLoraModule(pl.LightningModule):
    """Trains the adapter parameters of ``model`` (already injected) and evaluates per-task accuracy.

    Args:
        model: HF causal LM with a moelora adapter injected (base frozen).
        tokenizer: its tokenizer (decodes generated answers).
        optimizer: ``functools.partial`` of an optimizer class (Hydra ``_partial_: true``),
            completed here with the trainable parameters.
        scheduler: partial of ``moelora.training.warmup_lr_schedule`` (or None), completed with the
            optimizer and the number of optimizer steps.
        task_names: tasks for which ``val/acc/<task>`` and ``test/acc/<task>`` are logged.
        score_fn: ``(example, generated_text) -> bool``, e.g. ``moelora.data.score_prediction``.
        max_new_tokens: greedy generation length for the accuracy evaluation.
        router_stats_every_n_steps: how often the per-layer router statistics are logged (0 = never).
        compiled_expert_hidden: train MixLoRA with its expert hidden compiled
            (``moelora.layers.dispatch.compiled_expert_hidden``: Inductor fuses the elementwise passes
            over the (tokens, top-k, FFN) tensors; 9-11% faster steps on the H200, 7B shape). Off by
            default: the first steps compile (tens of seconds; needs a C++ compiler on CPU).
        mixture_recompute: MixLoRA's expert mixture is recomputed in the backward instead of its
            (tokens, top-k, FFN) activations being stored (``moelora.layers.mix_recompute``; the
            default). False trades memory for speed: on the H100, 7B shape, 4 x 1024 tokens, the
            step took 533 instead of 611 ms at 69.4 instead of 44.8 GB peak
            (experiments/2026-12-02_h200, eleventh session).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None,
        task_names: Sequence[str],
        score_fn: Callable[[dict, str], bool],
        max_new_tokens: int = 16,
        router_stats_every_n_steps: int = 25,
        compiled_expert_hidden: bool = False,
        mixture_recompute: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.task_names = list(task_names)
        self.score_fn = score_fn
        self.max_new_tokens = max_new_tokens
        self.router_stats_every_n_steps = router_stats_every_n_steps
        self.compiled_expert_hidden = bool(compiled_expert_hidden)
        self.mixture_recompute = bool(mixture_recompute)
        self.acc = nn.ModuleDict(
            {stage: nn.ModuleDict({_metric_key(t): MeanMetric() for t in self.task_names}) for stage in ("val", "test")}
        )

    # ---- checkpoint content: adapter + RNG only -------------------------------------------
    def state_dict(self, *args: Any, destination: dict | None = None, prefix: str = "", keep_vars: bool = False):
        """The adapter tensors only (``lora_*``/``router*``): the frozen base is rebuilt from its
        source when a run resumes, so it never goes into a checkpoint."""
        out = destination if destination is not None else OrderedDict()
        for k, v in moelora.adapter_state_dict(self.model).items():
            out[prefix + _KEY_PREFIX + k] = v
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Strict, shape-checked load of the adapter tensors (``strict=False`` is not honoured:
        a checkpoint that does not match the adapter is always an error)."""
        bad = [k for k in state_dict if not k.startswith(_KEY_PREFIX)]
        if bad:
            raise KeyError(f"checkpoint holds tensors outside the adapter, e.g. {bad[:3]}")
        moelora.load_adapter_state_dict(self.model, {k[len(_KEY_PREFIX) :]: v for k, v in state_dict.items()})
        return nn.modules.module._IncompatibleKeys([], [])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout and router jitter draw from torch's RNG: restoring it makes the resumed run
        # draw the same masks as the uninterrupted one.
        rng = {"torch": torch.get_rng_state(), "dropout": dropout_rng_states(self.model)}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["moelora_rng"] = rng
        checkpoint["moelora_adapter_config"] = moelora.get_adapter_config(self.model).to_dict()
        checkpoint[BASE_KEY] = base_signature(self.model)  # checked on resume (checkpoint.check_resumable)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_same_adapter(checkpoint, self.model)
        rng = checkpoint.get("moelora_rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        set_dropout_rng_states(self.model, rng.get("dropout", {}))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def on_fit_start(self) -> None:
        # HF models load in eval mode and Lightning keeps a module's mode: without this, LoRA
        # dropout and router jitter would silently be off during training.
        self.model.train()

    # ---- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters: was an adapter injected?")
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def _lm_batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        # the forward decides the form; the backward recompute Lightning runs later takes the same
        with compiled_expert_hidden(self.compiled_expert_hidden), plain_mixture_backward(not self.mixture_recompute):
            out = self.model(**self._lm_batch(batch))
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            self.log("train/aux_loss", aux, batch_size=bs)
            self.log("train/ce_loss", out.loss - aux, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        n = self.router_stats_every_n_steps
        if n and self.global_step % n == 0:
            self._log_router_statistics()
        return out.loss

    def _log_router_statistics(self) -> None:
        """Per routed layer: expert load fractions, load CV, routing entropy (last forward)."""
        logs = router_log_dict(self.model)
        if logs:  # (plain LoRA: nothing is routed)
            self.log_dict(logs, on_step=True, on_epoch=False)

    # ---- evaluation: teacher-forced loss (dataloader 0) + greedy exact match (dataloader 1) -
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    def _eval_step(self, stage: str, batch: Mapping[str, Any], dataloader_idx: int) -> None:
        bs = batch["input_ids"].shape[0]
        if dataloader_idx == 0:
            out = self.model(**self._lm_batch(batch))
            aux = getattr(out, "aux_loss", None)
            ce = out.loss - aux if aux is not None else out.loss  # CE only: comparable across methods
            self.log(f"{stage}/loss", ce, batch_size=bs, sync_dist=True, add_dataloader_idx=False, prog_bar=True)
            return
        predictions = self.generate_answers(batch["input_ids"], batch["attention_mask"])
        for example, pred in zip(batch["examples"], predictions):
            correct = float(self.score_fn(example, pred))
            self.acc[stage][_metric_key(example["task"])].update(torch.tensor(correct, device=self.device))

    @torch.no_grad()
    def generate_answers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Greedy continuation of left-padded prompts, decoded without special tokens."""
        tok = self.tokenizer
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        return tok.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)

    def _log_accuracy(self, stage: str) -> None:
        accs = {}
        for task in self.task_names:
            metric = self.acc[stage][_metric_key(task)]
            if metric.update_called:
                accs[task] = metric.compute()
            metric.reset()
        if not accs:
            return
        # MeanMetric.compute() already reduced over ranks (each rank scores the whole eval split,
        # so the mean is exact); sync_dist only averages identical values and silences Lightning.
        self.log_dict({f"{stage}/acc/{t}": v for t, v in accs.items()}, add_dataloader_idx=False, sync_dist=True)
        mean = torch.stack(list(accs.values())).mean()  # macro average over tasks
        self.log(f"{stage}/acc", mean, prog_bar=True, add_dataloader_idx=False, sync_dist=True)
