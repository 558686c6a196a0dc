# python experiments/2026-12-02_serve_step_profile/swap_cost.py   (CPU, ~1 min)
"""How long the registry's swap steps take on a 32-layer narrow Llama (CPU): add_adapter (new slot),
load_adapter_state_dict (copy), delete_adapter, and the first mixed forward after a change."""
import time, torch, moelora
from transformers import LlamaConfig, LlamaForCausalLM
from moelora.state import BatchPlan
torch.manual_seed(0)
cfgm = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=32, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=1000)
model = LlamaForCausalLM(cfgm).eval()
def lcfg(r): return moelora.config_from_dict(dict(method="lora", r=r, lora_alpha=2*r, lora_dropout=0.0))
mcfg = moelora.config_from_dict(dict(method="mixlora", num_experts=8, top_k=2, r=8, lora_alpha=16, lora_dropout=0.0))
names = []
for i in range(16):
    c = mcfg if i % 4 == 3 else lcfg([8,16,32,64][i % 4])
    t = time.perf_counter(); moelora.add_adapter(model, f"s{i}", c, trainable=False); dt = time.perf_counter() - t
    names.append(f"s{i}")
    print(f"add_adapter #{i} ({c.to_dict()['method']}): {dt*1e3:.1f} ms")
sd = moelora.adapter_state_dict(model, "s1")
t = time.perf_counter(); moelora.load_adapter_state_dict(model, {k: v.clone() for k, v in sd.items()}, "s1"); print(f"load_adapter_state_dict: {(time.perf_counter()-t)*1e3:.1f} ms")
ids = torch.randint(0, 1000, (1, 16))
plan_names = tuple(names) + (None,)
slots = torch.arange(16)
def fwd(epoch):
    t = time.perf_counter()
    with torch.no_grad():
        model(ids, adapter_names=BatchPlan.per_token(plan_names, slots, epoch=epoch))
    return (time.perf_counter() - t) * 1e3
print("first mixed fwd", fwd(1)); print("second", fwd(1)); print("new epoch, same", fwd(2))
moelora.load_adapter_state_dict(model, {k: v.clone() for k, v in sd.items()}, "s1")
print("after a copy into s1 (epoch 3)", fwd(3), "then", fwd(3))
t = time.perf_counter(); moelora.delete_adapter(model, "s5"); print(f"delete_adapter: {(time.perf_counter()-t)*1e3:.1f} ms")
t = time.perf_counter(); moelora.add_adapter(model, "s5", lcfg(16), trainable=False); print(f"add again: {(time.perf_counter()-t)*1e3:.1f} ms")
print("after re-add (epoch 4)", fwd(4), "then", fwd(4))
