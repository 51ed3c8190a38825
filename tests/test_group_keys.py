"""Param-group keys that would be silently ignored: every optimizer warns (IgnoredGroupKeyWarning,
naming the class, the key and the group) about a key it never reads, and about a low-rank
key in a group that is not low-rank; LDAdamW's groups without ``enable_lowrank`` give the
LowRankNotEnabledWarning subclass. The routes users take (make_optimizer with each method's
keys, HF-style labels, LR schedulers) give none."""
import warnings

import pytest
import torch

import lowrank_fused as lf
from lowrank_fused.optim import IgnoredGroupKeyWarning, LowRankNotEnabledWarning
from lowrank_fused.routing import METHODS, optimizer_class

from _methods import KW, model

CLASSES = sorted({optimizer_class(m) for m in METHODS} | {lf.HFAdamW}, key=lambda c: c.__name__)


def _ignored(fn):
    """(result, [messages of the IgnoredGroupKeyWarnings fn raised], [their categories])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    hits = [w for w in caught if issubclass(w.category, IgnoredGroupKeyWarning)]
    return out, [str(w.message) for w in hits], [w.category for w in hits], [w.filename for w in hits]


@pytest.mark.parametrize("method", METHODS)
def test_make_optimizer_routes_warn_nothing(method):
    _, msgs, _, _ = _ignored(lambda: lf.make_optimizer(model(), method, **KW[method]))
    assert msgs == []


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unknown_key_is_named(cls):
    p = torch.nn.Parameter(torch.randn(8, 6))
    b = torch.nn.Parameter(torch.randn(6))
    kw = dict(enable_lowrank=True) if cls is lf.LDAdamW else {}
    opt, msgs, cats, files = _ignored(lambda: cls([{"params": [p], "rnak": 4},
                                                  {"params": [b], "name": "bias",
                                                   "initial_lr": 1e-3}], **kw))
    assert len(msgs) == 1, msgs                        # the label keys are not reported
    assert cls.__name__ in msgs[0] and "'rnak'" in msgs[0] and "param group 0" in msgs[0]
    assert "not a param-group key" in msgs[0] and "holding parameter 0 (shape (8, 6))" in msgs[0]
    assert files == [__file__]                         # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredGroupKeyWarning)   # users can make it an error
        with pytest.raises(IgnoredGroupKeyWarning, match="param group 2 .* 'lr_decay'"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 5))],
                                 "lr_decay": 2})
    assert len(opt.param_groups) == 3


@pytest.mark.parametrize("method", ["galore", "adaptive_adamw", "galore_kfac", "adamem"])
def test_lowrank_key_in_a_dense_group(method):
    net = model()
    cls = optimizer_class(method)
    low = [net.model.layers[0].self_attn.q_proj.weight]
    dense = [net.model.embed_tokens.weight]
    _, msgs, _, _ = _ignored(lambda: cls([{"params": low, "rank": 4, "update_proj_gap": 3},
                                          {"params": dense, "update_proj_gap": 3}]))
    assert len(msgs) == 1 and "param group 1" in msgs[0] and "'update_proj_gap'" in msgs[0]
    assert "only low-rank groups read it" in msgs[0] and "'rank'" in msgs[0]


def test_adaptive_family_keys_of_another_method():
    q = torch.nn.Parameter(torch.randn(8, 6))
    _, msgs, _, _ = _ignored(lambda: lf.AdaptiveAdamW([{"params": [q], "rank": 2,
                                                        "kfac_update_freq": 5}]))
    assert len(msgs) == 1 and "AdaptiveAdamW" in msgs[0] and "'kfac_update_freq'" in msgs[0]
    _, msgs, _, _ = _ignored(lambda: lf.GaLoreKFACAdamW([{"params": [q], "rank": 2,
                                                          "kfac_update_freq": 5}]))
    assert msgs == []


def test_adapm_refresh_gap_of_another_method():
    _, msgs, _, files = _ignored(lambda: lf.make_optimizer(model(), "adapm", rank=4,
                                                           update_proj_gap=100))
    assert len(msgs) == 1 and "AdaPM" in msgs[0] and "'update_proj_gap'" in msgs[0]
    assert files == [__file__]


def test_ldadam_rank_without_enable_lowrank_runs_dense_and_warns():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8))
    opt, msgs, cats, _ = _ignored(lambda: lf.LDAdamW([{"params": [w], "rank": 4}],
                                                    backend="reference"))
    assert cats and all(c is LowRankNotEnabledWarning for c in cats)
    assert any("'rank'" in m and "param group 0" in m and "enable_lowrank=True" in m
               for m in msgs)
    assert any("no param group has enable_lowrank=True" in m for m in msgs)
    w.grad = torch.randn_like(w)
    opt.step()
    assert "basis" not in opt.state[w] and opt.state[w]["exp_avg"].shape == w.shape   # dense


def test_ldadam_explicit_choices_do_not_warn_as_not_enabled():
    w, b = torch.nn.Parameter(torch.randn(12, 8)), torch.nn.Parameter(torch.randn(8))
    _, msgs, _, _ = _ignored(lambda: lf.LDAdamW([{"params": [w], "rank": 4,
                                                  "enable_lowrank": True},
                                                 {"params": [b], "enable_lowrank": False}]))
    assert msgs == []
    _, msgs, _, _ = _ignored(lambda: lf.LDAdamW([w], rank=4, enable_lowrank=True))
    assert msgs == []
    # explicitly dense but with a low-rank key: ignored, said so, not the "not enabled" case
    _, msgs, cats, _ = _ignored(lambda: lf.LDAdamW([{"params": [w], "rank": 4,
                                                     "enable_lowrank": False},
                                                    {"params": [b], "enable_lowrank": True}]))
    assert cats == [IgnoredGroupKeyWarning] and "'rank'" in msgs[0]


def test_refused_group_raises_instead_of_warning():
    p = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="rank"):
        lf.GaLoreAdamW([{"params": [p], "rank": 0, "rnak": 1}])


def test_scheduler_keys_and_resume_do_not_warn():
    net = model()
    opt = lf.make_optimizer(net, "galore", **KW["galore"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)   # adds initial_lr
    sd = opt.state_dict()
    _, msgs, _, _ = _ignored(lambda: lf.make_optimizer(net, "galore", **KW["galore"])
                             .load_state_dict(sd))
    assert msgs == [] and sched.get_last_lr()
