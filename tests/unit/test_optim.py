"""imager.training.optim: AdamW, fused where torch has the kernel, the same algorithm either way."""

from __future__ import annotations

import torch

from imager.training.optim import adamw


def _train(fused: bool, steps: int = 5) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}
    opt = adamw(model.parameters(), **kwargs) if fused else torch.optim.AdamW(model.parameters(), **kwargs, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], opt


def test_fused_adamw_on_cpu_matches_the_reference_implementation():
    fused, opt = _train(True)
    reference, ref_opt = _train(False)
    assert opt.defaults["fused"] and not ref_opt.defaults.get("fused")  # this torch (>= 2.4) has the CPU kernel
    for a, b in zip(fused, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - p).abs().max() > 1e-3 for a, p in zip(fused, _train(True, steps=0)[0], strict=True))  # it moved


def test_without_a_fused_kernel_it_falls_back_to_plain_adamw(monkeypatch):
    real = torch.optim.AdamW

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    params = [torch.nn.Parameter(torch.ones(3))]  # a generator would be spent by the failed attempt: a list is kept
    opt = adamw(iter(params), lr=0.1)
    assert isinstance(opt, real) and not opt.defaults.get("fused") and opt.param_groups[0]["params"] == params
