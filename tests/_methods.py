"""Every method on a tiny LLaMA: the optimizer keywords that make refreshes (and AdaptiveAdamW
rank changes) happen within a few steps. Shared by the robustness tests."""
import torch

import lowrank_fused as lf
from lowrank_fused.models import LlamaConfig, LlamaForCausalLM
from lowrank_fused.routing import METHODS

CFG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
           vocab_size=64, max_position_embeddings=16)
KW = {"galore": dict(rank=4, update_proj_gap=2), "adaptive_adamw": dict(rank=4, update_proj_gap=2),
      "rsadamw": dict(rank=4, update_proj_gap=2), "gha": dict(rank=4, update_proj_gap=2),
      "galore_kfac": dict(rank=4, update_proj_gap=2), "adarankgrad": dict(rank=4, t_min=2),
      "ldadam": dict(rank=4), "adamem": dict(rank=4, update_proj_gap=2), "adapm": dict(rank=4),
      "adapm_mini": dict(rank=4), "adamw": {}, "adafactor": {}}
assert set(KW) == set(METHODS)


def model(seed=0, dtype=torch.float32, **over):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CFG, **over})).to(dtype)


def optimizer(net, method, **over):
    return lf.make_optimizer(net, method, **{**KW[method], **over})


def backward(net, t):
    """Fresh gradients of batch ``t`` (seeded by t) in the parameters' .grad."""
    g = torch.Generator().manual_seed(1000 + t)
    ids = torch.randint(0, CFG["vocab_size"], (2, 9), generator=g)
    _, loss = net(ids[:, :-1], labels=ids[:, 1:])
    loss.backward()
    return loss


def snapshot(net, opt):
    """Every weight and every optimizer state value, cloned."""
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
             for i, st in enumerate(opt.state[p] for g in opt.param_groups for p in g["params"])}
    return weights, state


def assert_same(a, b, what=""):
    """Bit-identical snapshots (NaN == NaN)."""
    (wa, sa), (wb, sb) = a, b
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{what}: weight {k} changed"
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), f"{what}: state keys of parameter {i} changed"
        for k, v in sa[i].items():
            w = sb[i][k]
            if torch.is_tensor(v):
                assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(
                    torch.nan_to_num(v), torch.nan_to_num(w)), f"{what}: state {i}.{k} changed"
            else:
                assert v == w or (v != v and w != w), f"{what}: state {i}.{k} changed"
