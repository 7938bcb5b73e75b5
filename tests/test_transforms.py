"""torch.func transforms and forward-mode AD through the frozen modules and functional
forms: each gives what it gives for the same arithmetic written with ATen ops (the fp64
reference ``(x - mean) / sqrt(var + eps) * weight + bias``, then the activation)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from frozennorm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNormAct2d
from frozennorm import frozen_batch_norm, frozen_batch_norm_act

ACTS = {"identity": nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(), "silu": nn.SiLU()}


def make_module(kind: str, act: str = "identity") -> nn.Module:
    m = {"bn1d": FrozenBatchNorm1d(5), "bn2d": FrozenBatchNorm2d(5),
         "act2d": FrozenBatchNormAct2d(5, act=ACTS[act])}[kind].double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(5, generator=g) * 3)
        m.running_var.copy_(torch.rand(5, generator=g) * 2 + 0.01)
        m.weight.copy_(torch.randn(5, generator=g))
        m.bias.copy_(torch.randn(5, generator=g))
    return m


def reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's arithmetic as plain ATen ops, every transform's own rules."""
    view = [1, -1] + [1] * (x.dim() - 2)
    y = ((x - m.running_mean.view(view)) / torch.sqrt(m.running_var.view(view) + m.eps)
         * m.weight.view(view) + m.bias.view(view))
    return m.act(y) if isinstance(m, FrozenBatchNormAct2d) else y


def data(kind: str) -> torch.Tensor:
    shape = (3, 5) if kind == "bn1d" else (3, 5, 4, 4)
    x = torch.randn(shape, dtype=torch.float64) * 4
    if kind != "bn1d":
        x[0, 0, 0, 0] = 6.0 + 1e-3  # ReLU6's flat part
    return x


CASES = [("bn1d", "identity"), ("bn2d", "identity")] + [("act2d", a) for a in ACTS]


@pytest.mark.parametrize("kind,act", CASES)
def test_reverse_mode_transforms(kind, act):
    m, x = make_module(kind, act), data(kind)
    f, ref = (lambda t: m(t).pow(2).sum()), (lambda t: reference(m, t).pow(2).sum())
    torch.testing.assert_close(torch.func.grad(f)(x), torch.func.grad(ref)(x))
    out, vjp = torch.func.vjp(m, x)
    out_ref, vjp_ref = torch.func.vjp(lambda t: reference(m, t), x)
    torch.testing.assert_close(out, out_ref)
    v = torch.randn_like(out)
    torch.testing.assert_close(vjp(v)[0], vjp_ref(v)[0])
    torch.testing.assert_close(torch.func.jacrev(m)(x[:1]),
                               torch.func.jacrev(lambda t: reference(m, t))(x[:1]))


@pytest.mark.parametrize("kind,act", CASES)
def test_forward_mode_transforms(kind, act):
    m, x = make_module(kind, act), data(kind)
    t = torch.randn_like(x)
    out, tangent = torch.func.jvp(m, (x,), (t,))
    out_ref, tangent_ref = torch.func.jvp(lambda u: reference(m, u), (x,), (t,))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(tangent, tangent_ref)
    assert tangent.abs().sum() > 0
    torch.testing.assert_close(torch.func.jacfwd(m)(x[:1]),
                               torch.func.jacfwd(lambda u: reference(m, u))(x[:1]))
    # torch.autograd.forward_ad, without functorch
    with fwAD.dual_level():
        dual = m(fwAD.make_dual(x, t))
        primal, tangent2 = fwAD.unpack_dual(dual)
    assert tangent2 is not None, "forward-mode AD lost the tangent"
    torch.testing.assert_close(primal, out_ref)
    torch.testing.assert_close(tangent2, tangent_ref)


@pytest.mark.parametrize("kind,act", CASES)
def test_vmap_and_hessian(kind, act):
    m, x = make_module(kind, act), data(kind)
    batch = torch.stack([x, 2 * x, -x])
    torch.testing.assert_close(torch.func.vmap(m)(batch),
                               torch.func.vmap(lambda u: reference(m, u))(batch))
    # vmap over the statistics too (per-sample models), through functional_call
    params = {k: torch.stack([v, v * 1.5, v + 0.25]) for k, v in m.named_buffers()}
    params = {k: (v.abs() if "var" in k else v) for k, v in params.items()}

    def call(p, u):
        return torch.func.functional_call(m, p, (u,))

    def call_ref(p, u):
        view = [1, -1] + [1] * (u.dim() - 2)
        y = ((u - p["running_mean"].view(view)) / torch.sqrt(p["running_var"].view(view) + m.eps)
             * p["weight"].view(view) + p["bias"].view(view))
        return m.act(y) if isinstance(m, FrozenBatchNormAct2d) else y
    torch.testing.assert_close(torch.func.vmap(call)(params, batch),
                               torch.func.vmap(call_ref)(params, batch))
    if act in ("identity", "silu"):  # twice differentiable
        small = x[:1, :, :2] if x.dim() == 4 else x[:1]
        h = torch.func.hessian(lambda u: m(u).pow(3).sum())(small)
        h_ref = torch.func.hessian(lambda u: reference(m, u).pow(3).sum())(small)
        torch.testing.assert_close(h, h_ref)


def test_per_sample_gradients_through_a_model():
    """The usual torch.func recipe (functional_call + vmap(grad)) on a conv net with frozen
    BatchNorm and a fused BN + add + ReLU, in float32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    bn = make_module("bn2d").float()
    model = nn.Sequential(conv, bn, nn.ReLU())
    x, target = torch.randn(4, 3, 6, 6), torch.randn(4, 5, 6, 6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, b, u, t):
        out = torch.func.functional_call(model, (p, b), (u[None],))
        return F.mse_loss(out, t[None])
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0, 0))(
        params, buffers, x, target)
    for i in range(4):
        model.zero_grad()
        F.mse_loss(model(x[i:i + 1]), target[i:i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "identity"])
def test_functional_forms_under_grad(act):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g) * 3
    r = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g)
    mean, var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.1
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    fn = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "identity": lambda t: t}[act]

    def ours(u, res, wt):
        return frozen_batch_norm_act(u, mean, var, wt, b, 1e-3, act, res).sum()

    def ref(u, res, wt):
        return fn(F.batch_norm(u, mean, var, wt, b, False, 0.0, 1e-3) + res).sum()
    got = torch.func.grad(ours, argnums=(0, 1, 2))(x, r, w)
    want = torch.func.grad(ref, argnums=(0, 1, 2))(x, r, w)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    gx = torch.func.grad(lambda u: frozen_batch_norm(u, mean, var, w, b, 1e-3).sum())(x)
    torch.testing.assert_close(gx, torch.func.grad(
        lambda u: F.batch_norm(u, mean, var, w, b, False, 0.0, 1e-3).sum())(x))
