# python experiments/2026-12-02_serve_step_profile/restack_cost.py [--device cuda --dtype bfloat16] [--out FILE]
# (CPU: ~1 min)
"""What a change of ONE stack position costs the next mixed forward (the serving engine's case:
an adapter enters a step and takes a position, or a slot is re-filled with another adapter).

A 32-layer narrow Llama (the 7B shape's 224 adapted linears and 32 FFNs, small tensors so host
time shows), 16 positions of LoRA (ranks 8-64) and MixLoRA (8 experts, top-2) adapters plus the
base, 16 tokens, one per position. Timed per forward (median of --repeats):
  same: the same composition and epoch as the last forward (nothing to check or build),
  new_epoch: same composition, new epoch (a slot outside it changed: nothing rebuilt),
  swap_name: one position now holds another adapter of the same config (the name changes),
  refill: one slot's tensors copied over in place (``load_adapter_state_dict``, the registry's reuse).
  rebuild_all: every site's stacks dropped first: what each of the two cases above cost before the
      in-place row update (every position's tensors stacked again at every site).
Also counts aten ops of each case (TorchDispatchMode)."""
import argparse, json, platform, statistics, sys, time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import moelora
from moelora.state import BatchPlan, ChangeLog


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfgm = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=32, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=1000)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    model = LlamaForCausalLM(cfgm).to(dev, dt).eval()
    lcfg = lambda r: moelora.config_from_dict(dict(method="lora", r=r, lora_alpha=2 * r, lora_dropout=0.0))
    mcfg = moelora.config_from_dict(dict(method="mixlora", num_experts=8, top_k=2, r=16, lora_alpha=32, lora_dropout=0.0))
    cfgs = [mcfg if i % 4 == 3 else lcfg([8, 16, 32, 64][i % 4]) for i in range(16)]
    for i, c in enumerate(cfgs):  # 16 positions and a spare of each config
        moelora.add_adapter(model, f"s{i}", c, trainable=False)
        moelora.add_adapter(model, f"x{i}", c, trainable=False)
    for n in [a["name"] if isinstance(a, dict) else a for a in moelora.list_adapters(model)]:
        sd = moelora.adapter_state_dict(model, n)
        moelora.load_adapter_state_dict(model, {k: torch.randn_like(v) * 0.02 for k, v in sd.items()}, n)
    ids = torch.randint(0, 1000, (1, 16), device=dev)
    slots = torch.arange(16, device=dev)
    names = [f"s{i}" for i in range(16)]
    # the plans carry an epoch and the log of what changed, as the serving engine's do (its
    # registry records every slot it adds, writes or drops)
    log = ChangeLog()

    def fwd(plan_names, new_epoch, changed=("elsewhere",)):
        for n in changed if new_epoch else ():
            log.record(n, structural=False)
        plan = BatchPlan.per_token(tuple(plan_names) + (None,), slots, epoch=log.epoch, changes=log)
        with torch.no_grad():
            sync()
            t = time.perf_counter()
            out = model(ids, adapter_names=plan).logits
            sync()
            return (time.perf_counter() - t) * 1e3, out

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def drop_stacks():
        for m in model.modules():
            if hasattr(m, "batch_stacks"):
                m.batch_stacks = None
                m.__dict__.pop("_slots_memo", None)

    fwd(names, True); fwd(names, False)
    rows = {"same": [], "new_epoch": [], "swap_name": [], "refill": [], "rebuild_all": []}
    ops = {}
    for rep in range(args.repeats):
        p = (rep * 5) % 16
        rows["same"].append(fwd(names, False)[0])
        rows["new_epoch"].append(fwd(names, True)[0])
        names[p] = ("x" if names[p].startswith("s") else "s") + str(p)  # another adapter of that config
        rows["swap_name"].append(fwd(names, True, (names[p],))[0])
        sd = moelora.adapter_state_dict(model, names[p])
        moelora.load_adapter_state_dict(model, {k: torch.randn_like(v) * 0.02 for k, v in sd.items()}, names[p])
        rows["refill"].append(fwd(names, True, (names[p],))[0])
        drop_stacks()
        rows["rebuild_all"].append(fwd(names, True)[0])
    for case in rows:
        c = Count()
        p = 7
        if case == "swap_name":
            names[p] = ("x" if names[p].startswith("s") else "s") + str(p)
        if case == "refill":
            sd = moelora.adapter_state_dict(model, names[p])
            moelora.load_adapter_state_dict(model, {k: torch.randn_like(v) * 0.02 for k, v in sd.items()}, names[p])
        if case == "rebuild_all":
            drop_stacks()
        with c:
            fwd(names, case != "same", (names[p],) if case in ("swap_name", "refill") else ("elsewhere",))
        ops[case] = c.n
    # the result must equal a forward whose stacks are all built afresh (no cache at any site)
    _, mixed = fwd(names, True)
    drop_stacks()
    _, fresh = fwd(names, True)
    worst = (fresh - mixed).abs().max().item()
    res = {"ms_median": {k: round(statistics.median(v), 2) for k, v in rows.items()},
           "ms_all": {k: [round(x, 2) for x in v] for k, v in rows.items()},
           "aten_ops": ops, "max_abs_diff_vs_fresh_stacks": worst,
           "torch": torch.__version__, "python": platform.python_version(), "dtype": args.dtype,
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (2 threads)",
           "command": "python experiments/2026-12-02_serve_step_profile/restack_cost.py " + " ".join(sys.argv[1:])}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
