"""Run an adapted model tensor-parallel: ``torchrun --nproc_per_node=N -m moelora.parallel.run ...``

Every rank loads the same base model, applies a saved adapter (``--adapter DIR``) or a fresh one
(``--adapter bdlora``: block-diagonal LoRA with nblocks = N; ``--adapter lora``: plain LoRA), shards
it with ``moelora.parallel.parallelize`` and then generates (``--task generate``) or trains a few
steps on the synthetic suite (``--task train``; ``--save DIR`` writes the trained adapter, gathered,
from rank 0). ``--check`` also runs the unsharded model on every rank and compares (tiny models).

CPU: gloo (``--device cpu``, the default without CUDA); GPUs: nccl, one GPU per rank. Only argparse
and moelora's own modules: no Hydra, so it runs where only torch and transformers are installed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import moelora
from moelora.data.collate import CausalLMCollator, TokenizedDataset, build_generation_batch, model_inputs
from moelora.data.loading import load_examples
from moelora.models import load_base_model

from .model import FORMS, full_adapter_state_dict, parallelize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m moelora.parallel.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2, or a local Hugging Face model folder")
    p.add_argument("--adapter", default="bdlora", help="bdlora / lora (fresh), none, or a saved adapter folder")
    p.add_argument("--form", choices=FORMS, default=None, help="default: bdlora for block-diagonal, slora for plain LoRA")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of a fresh adapter")
    p.add_argument("--task", choices=("generate", "train"), default="generate")
    p.add_argument("--prompt", default="12+7=", help="the prompt for --task generate")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps for --task train")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="--task train: write the trained adapter here (rank 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--check", action="store_true", help="compare with the unsharded model on every rank")
    return p.parse_args(argv)


def _fresh_config(kind: str, r: int, tp_size: int):
    if kind == "bdlora":
        return moelora.BdLoraConfig(r=r, lora_alpha=2 * r, nblocks=tp_size, lora_dropout=0.0)
    return moelora.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0)


def build(args, tp_size: int, device: torch.device):
    """(model, tokenizer) with the adapter of ``args`` on ``device``, unsharded."""
    model, tok = load_base_model(args.model, dtype=DTYPES[args.dtype])
    if args.adapter in ("bdlora", "lora"):
        torch.manual_seed(args.seed)  # the same fresh adapter on every rank
        moelora.inject_adapter(model, _fresh_config(args.adapter, args.lora_rank, tp_size))
    elif args.adapter != "none":
        if not os.path.isdir(args.adapter):
            raise SystemExit(f"moelora.parallel.run: error: --adapter {args.adapter!r} is not bdlora, lora, none "
                             "or an adapter folder")
        moelora.load_adapter(model, args.adapter)
    return model.to(device), tok


def generate(model, tok, args, device) -> torch.Tensor:
    batch = build_generation_batch(tok, [{"prompt": args.prompt}])
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)


def train(model, tok, args, device, log) -> list[float]:
    examples = load_examples("synthetic", limit=args.steps * args.batch_size, seed=args.seed)
    data = TokenizedDataset(examples, tok, max_length=64)
    collate = CausalLMCollator(tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    model.train()
    losses = []
    for step in range(args.steps):
        items = [data[(step * args.batch_size + i) % len(data)] for i in range(args.batch_size)]
        batch = {k: v.to(device) for k, v in model_inputs(collate(items)).items()}  # with labels
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        log(f"step {step + 1}/{args.steps}  loss {losses[-1]:.4f}")
    model.eval()
    return losses


def main(argv=None) -> int:
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        raise SystemExit("moelora.parallel.run: error: start it with torchrun --nproc_per_node=N -m moelora.parallel.run")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    try:
        from torch.distributed.tensor import init_device_mesh

        mesh = init_device_mesh(device.type, (n,))
        model, tok = build(args, n, device)
        try:
            parallelize(model, mesh, args.form)
        except (ValueError, NotImplementedError) as err:  # what does not fit: one line, exit 2
            log(f"moelora.parallel.run: error: {err}")
            return 2
        log(f"tensor-parallel over {n} {device.type} ranks ({dist.get_backend()}): {args.model}, adapter "
            f"{args.adapter}, {moelora.trainable_parameters(model)['trainable']} trainable parameters")
        # The Triton decode kernels and decode graphs read local tensors; the adapters' torch paths
        # run on DTensors (GPU only: on CPU they are the default anyway).
        with moelora.kernel_backend("torch"), moelora.decode_graphs(False):
            if args.task == "train":
                losses = train(model, tok, args, device, log)
                if args.save:
                    sd = full_adapter_state_dict(model)  # a collective: every rank
                    if rank == 0:
                        plain, _ = build(argparse.Namespace(**{**vars(args), "adapter": "none"}), n, "cpu")
                        moelora.inject_adapter(plain, moelora.get_adapter_config(model))
                        moelora.load_adapter_state_dict(plain, {k: v.cpu() for k, v in sd.items()})
                        log(f"saved {moelora.save_adapter(plain, args.save)}")
                out = losses
            else:
                t0 = time.perf_counter()
                out = generate(model, tok, args, device)
                dt = time.perf_counter() - t0
                text = tok.decode(out[0, -args.max_new_tokens:], skip_special_tokens=True)
                log(f"prompt {args.prompt!r} -> {text!r}  ({args.max_new_tokens} tokens in {dt:.2f} s)")
            if args.check:
                ref, _ = build(args, n, device)
                with torch.random.fork_rng():
                    want = train(ref, tok, args, device, lambda _: None) if args.task == "train" else generate(ref, tok, args, device)
                same = (torch.equal(out, want) if args.task == "generate"
                        else torch.allclose(torch.tensor(out), torch.tensor(want), atol=1e-4))
                flag = torch.tensor([int(same)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank agrees with its unsharded run
                log(f"check against the unsharded model: {'equal' if flag.item() else 'DIFFERENT'}")
                if not flag.item():
                    return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
