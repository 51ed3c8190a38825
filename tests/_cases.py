"""Shapes, ranks and dtypes shared by the kernel parity tests."""
import torch

# odd, non-power-of-two sizes, both orientations, a square one, a single row
SHAPES = [(97, 203), (203, 97), (64, 64), (1, 33), (130, 257)]
DTYPES = [torch.float32, torch.bfloat16]


def ranks_for(shape):
    """Runtime ranks to test for a matrix: 1, an odd middle value, and min(m, n)."""
    lo = min(shape)
    return sorted({1, max(1, lo // 3) | 1, lo} )


def orthonormal(rows, cols, device, generator=None):
    A = torch.randn(rows, cols, device=device, dtype=torch.float64, generator=generator)
    return torch.linalg.qr(A)[0].float()


def basis(shape, rank, side, device):
    """A random orthonormal basis in the stored layout: P (m x r) left, Q (r x n) right."""
    m, n = shape
    return orthonormal(m, rank, device) if side == "left" else orthonormal(n, rank, device).t().contiguous()


def tiny_lm_task(seed=0):
    """A 2-layer tiny LLaMA and a batch sampler for a learnable synthetic task: a
    deterministic successor rule from a random start (never constant)."""
    from lowrank_fused.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         max_position_embeddings=16))
    g = torch.Generator().manual_seed(seed + 1)

    def batch():
        start = torch.randint(0, 32, (8, 1), generator=g)
        seq = (start * 5 + 3 * torch.arange(17)) % 32
        return seq[:, :-1], seq[:, 1:]

    return model, batch


def lm_loss(model, batch):
    """The next-token cross-entropy of one ``tiny_lm_task`` batch (fp32 logits)."""
    x, y = batch()
    logits = model(x)
    logits = logits[0] if isinstance(logits, tuple) else logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


GEMM_OPS = ("project", "backproject_update", "grouped_project", "grouped_backproject_update")


def count_kernel_runs(monkeypatch):
    """A ``collections.Counter`` kernel name -> launches, filled from now on: every
    ``kernel[grid](...)`` (the class method behind it: ``JITFunction.run``, or the
    interpreter's), the launches planned by ``kernels/_launch.py`` included (restored by
    ``monkeypatch``)."""
    import collections

    import triton

    cls = type(triton.jit(lambda: None))
    real = cls.run
    counts = collections.Counter()

    def run(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return counts


def count_calls(monkeypatch, ops=GEMM_OPS, backend="triton"):
    """A dict op -> calls, filled while the test runs: each op's ``backend`` entry in the
    dispatch table is wrapped (restored by ``monkeypatch``)."""
    from lowrank_fused import dispatch

    calls = {}
    for op in ops:
        real = dispatch.lookup(op, backend)           # imports the provider if need be

        def counted(*a, _real=real, _op=op, **k):
            calls[_op] = calls.get(_op, 0) + 1
            return _real(*a, **k)
        monkeypatch.setitem(dispatch._TABLE[op], backend, counted)
    return calls
