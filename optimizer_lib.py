"""Optimizers of Memory Aware Synapses (Aljundi et al., ECCV 2018).

MAS trains task t on  L(theta) = L_t(theta) + reg_lambda * sum_ij Omega_ij (theta_ij - theta*_ij)^2  (Eq. 3).
The penalty is never an autograd term: its gradient 2 * reg_lambda * Omega * (theta - theta*)
is added locally, inside the optimizer step, as the authors' code does.

- ``LocalSgd``: SGD with momentum and weight decay plus that local penalty gradient. For a
  large model the penalty is memory-bound (AlexNet: 57 M parameters, so Omega and theta* are
  460 MB to read every step); the penalty and the SGD update are therefore fused into one
  ``torch.compile``d pass over memory, with an eager fallback where no compiler is available.
  It can also accumulate the path integral of Synaptic Intelligence (Zenke et al., ICML 2017).
- ``OmegaUpdate``: accumulates importance from gradients during the importance pass, as a
  running mean over samples (the authors' ``MAS_Omega_update``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from importance import running_mean_

FUSED_MODES = ("auto", "compile", "eager")
PENALTY_STEPS = ("explicit", "proximal")
# Below this many penalised elements the step is launch-bound, not memory-bound,
# and compiling costs more than it saves.
COMPILE_MIN_NUMEL = 1_000_000


def _penalised_sgd(params, grads, bufs, weights, theta_stars, lr, momentum, weight_decay, reg2, proximal):
    """One step of LocalSgd on every penalised parameter, reg2 = 2 lambda (Eq. 3).

    explicit: SGD on  g + weight_decay * theta + reg2 * Omega * (theta - theta*).
    proximal: SGD on  g + weight_decay * theta, giving v, then the proximal map of the penalty
    (see LocalSgd), theta <- (v + c theta*) / (1 + c) = theta* + (v - theta*) * keep with
    c = lr * reg2 * Omega / (1 - momentum) and keep = 1 / (1 + c), computed once per learning rate.
    ``weights`` are Omega (explicit) or keep (proximal): no division per step, the same reads.
    Written per element so that the compiler fuses it into one read of
    (theta, g, buf, Omega, theta*) and one write of (theta, buf) per parameter. ``proximal``
    is a Python bool: the compiler specialises on it (one graph per mode, compiled on first use).
    """
    for p, g, buf, weight, theta_star in zip(params, grads, bufs, weights, theta_stars):
        if proximal:
            buf.mul_(momentum).add_(g + weight_decay * p)
            p.copy_(theta_star + (p - lr * buf - theta_star) * weight)
        else:
            d_p = g + weight_decay * p + reg2 * weight * (p - theta_star)
            buf.mul_(momentum).add_(d_p)
            p.sub_(lr * buf)


_compiled_penalised_sgd = None


def _compiled_step():
    global _compiled_penalised_sgd
    if _compiled_penalised_sgd is None:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        _compiled_penalised_sgd = torch.compile(_penalised_sgd, fullgraph=True, dynamic=False)
    return _compiled_penalised_sgd


def _check_penalty_step(penalty_step: str) -> str:
    if penalty_step not in PENALTY_STEPS:
        raise ValueError(f"penalty_step must be one of {PENALTY_STEPS}, got {penalty_step!r}")
    return penalty_step


class LocalSgd(Optimizer):
    """SGD (momentum, weight decay) with the MAS penalty reg_lambda * Omega * (theta - theta*)^2 (Eq. 3).

    Importance is attached per parameter with :meth:`set_importance`; it lives in
    ``self.state[p]`` (keys ``omega`` and ``theta_star``), so it follows the parameter's
    device and round-trips through ``state_dict()``. Parameters without importance
    take a plain SGD step, identical to ``torch.optim.SGD``.

    fused: ``"compile"`` fuses penalty and update with ``torch.compile``; ``"eager"``
    uses ``torch._foreach_*`` ops; ``"auto"`` compiles when at least
    ``COMPILE_MIN_NUMEL`` elements carry importance and falls back to eager (with a
    warning) if compilation fails.
    track_path: accumulate Synaptic Intelligence's path integral
    ``state[p]["path_integral"] += -g * delta_theta`` for every parameter that has
    that state (see :meth:`start_path_integral`); g is the data gradient, without the penalty,
    and delta_theta the whole change of the step (with the penalty's pull, in either mode).

    penalty_step: how the penalty enters the step (both use lr; m = momentum, wd = weight_decay):

    - ``"explicit"`` (default; the authors' step): its gradient 2 * reg_lambda * Omega * (theta - theta*)
      at the current theta is added to g before weight decay and momentum, so it is carried in the
      momentum buffer. On the penalty's curvature k = 2 * reg_lambda * Omega this is stable only
      while lr * k < 2 (1 + m).
    - ``"proximal"``: an SGD step on the data alone, buf <- m * buf + g + wd * theta and
      v = theta - lr * buf, then the exact proximal map of the penalty with the step
      eta = lr / (1 - m), the effective step of heavy-ball momentum on a steady gradient:
      theta <- (v + c * theta*) / (1 + c),  c = 2 * eta * reg_lambda * Omega = eta * k  (elementwise).
      Derivation: prox(v) = argmin_u reg_lambda Omega (u - theta*)^2 + (u - v)^2 / (2 eta); the
      derivative 2 reg_lambda Omega (u - theta*) + (u - v) / eta vanishes at u (1 + c) = v + c theta*.
      How it differs from the authors' step: (1) the pull is implicit, taken at the new point, so
      without data gradient theta - theta* shrinks by 1 / (1 + c) per step, monotone and stable for
      any lr, reg_lambda and Omega >= 0 (the explicit step multiplies it by 1 - lr * k). For m = 0 and
      small c it equals the explicit pull applied at v, v - c (v - theta*), up to c^2 / (1 + c) * (v - theta*).
      (2) The penalty never enters the momentum buffer; where the explicit pull is carried on by the
      buffer (total weight lr / (1 - m)), the proximal pull acts once with that same weight eta, so
      both steps stop at the same points: where g + wd * theta + k (theta - theta*) = 0, the
      stationary points of Eq. 3, and ``reg_lambda`` means the same penalty with either step.
      (With c = 2 lr reg_lambda Omega instead, the fixed point would be that of (1 - m) * reg_lambda,
      a tenth of the penalty at the default m = 0.9.)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        reg_lambda: float = 0.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fused: str = "auto",
        penalty_step: str = "explicit",
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not reg_lambda >= 0.0:
            raise ValueError(f"reg_lambda must be >= 0, got {reg_lambda}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if fused not in FUSED_MODES:
            raise ValueError(f"fused must be one of {FUSED_MODES}, got {fused!r}")
        _check_penalty_step(penalty_step)
        defaults = dict(
            lr=lr, reg_lambda=reg_lambda, momentum=momentum, weight_decay=weight_decay, penalty_step=penalty_step
        )
        super().__init__(params, defaults)
        self.fused = fused
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}  # eager penalty step, not state: never saved
        self._keep: dict[torch.Tensor, tuple] = {}  # the proximal step's factor per parameter, not state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a state_dict saved before penalty_step existed
            group.setdefault("penalty_step", "explicit")

    def set_importance(self, param: torch.nn.Parameter, omega: torch.Tensor, theta_star: torch.Tensor) -> None:
        """Penalise ``param`` for moving away from ``theta_star``, weighted by ``omega``."""
        if omega.shape != param.shape or theta_star.shape != param.shape:
            raise ValueError(
                f"omega/theta_star shapes {tuple(omega.shape)}/{tuple(theta_star.shape)} "
                f"do not match the parameter's {tuple(param.shape)}"
            )
        state = self.state[param]
        state["omega"] = omega.detach().to(param, copy=True)
        state["theta_star"] = theta_star.detach().to(param, copy=True)

    def start_path_integral(self, param: torch.nn.Parameter) -> None:
        """Start (or restart) SI's path integral for ``param`` at zero."""
        self.state[param]["path_integral"] = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        tracked = [p for p in params if "path_integral" in self.state[p]]
        theta_before = [p.clone() for p in tracked]
        penalised = group["reg_lambda"] > 0
        anchored = [p for p in params if penalised and "omega" in self.state[p]]
        anchored_ids = {id(p) for p in anchored}
        plain = [p for p in params if id(p) not in anchored_ids]
        if plain:
            self._plain_step(plain, group)
        if anchored:
            self._anchored_step(anchored, group)
        if tracked:  # SI: omega += -g * delta_theta, with the data gradient g
            delta = torch._foreach_sub(tracked, theta_before)
            paths = [self.state[p]["path_integral"] for p in tracked]
            torch._foreach_addcmul_(paths, [p.grad for p in tracked], delta, value=-1.0)

    def _momentum_buffers(self, params: list) -> list:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                # Zero start: the first step gives buf = d_p exactly, as torch.optim.SGD's clone.
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return bufs

    def _sgd_update(self, params: list, d_ps: list, group: dict) -> None:
        """theta <- theta - lr * buf, buf <- momentum * buf + d_p (torch.optim.SGD's arithmetic)."""
        if group["momentum"] > 0:
            bufs = self._momentum_buffers(params)
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d_ps)
            d_ps = bufs
        torch._foreach_add_(params, d_ps, alpha=-group["lr"])

    def _plain_step(self, params: list, group: dict) -> None:
        grads = [p.grad for p in params]
        if group["weight_decay"] > 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        self._sgd_update(params, grads, group)

    def _anchored_step(self, params: list, group: dict) -> None:
        grads = [p.grad for p in params]
        proximal = _check_penalty_step(group["penalty_step"]) == "proximal"
        omegas = [self._proximal_keep(p, group) if proximal else self.state[p]["omega"] for p in params]
        theta_stars = [self.state[p]["theta_star"] for p in params]
        reg2 = 2.0 * group["reg_lambda"]  # d/dtheta of lambda * Omega (theta - theta*)^2
        tensors = (params, grads, omegas, theta_stars)
        if self._use_compiled(params):
            try:
                self._compiled_anchored_step(*tensors, group, reg2, proximal)
                return
            except Exception as err:  # no C++/Triton compiler, unsupported platform, ...
                if self.fused == "compile":
                    raise
                warnings.warn(f"LocalSgd: torch.compile failed ({type(err).__name__}); using eager ops", stacklevel=3)
                self.fused = "eager"
        self._eager_anchored_step(*tensors, group, reg2, proximal)

    def _eager_anchored_step(self, params, grads, omegas, theta_stars, group, reg2, proximal) -> None:
        """Parameter by parameter, into a scratch buffer kept between steps: fresh temporaries of
        hundreds of MB every step would cost more (page faults) than the arithmetic itself."""
        bufs = self._momentum_buffers(params) if group["momentum"] > 0 else [None] * len(params)
        step_one = _eager_proximal_step if proximal else _eager_explicit_step
        for p, g, omega, theta_star, buf in zip(params, grads, omegas, theta_stars, bufs):
            scratch = self._scratch.get(p)
            if scratch is None or scratch.shape != p.shape or scratch.device != p.device:
                scratch = self._scratch[p] = torch.empty_like(p)
            step_one(p, g, omega, theta_star, buf, scratch, group, reg2)

    def _proximal_keep(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """keep = 1 / (1 + c), c = 2 eta lambda Omega, eta = lr / (1 - m): the proximal map's factor,
        recomputed only when lr, momentum or lambda change (a cache, like the scratch buffers: not state)."""
        omega = self.state[p]["omega"]
        key = (group["lr"], group["momentum"], group["reg_lambda"], id(omega), omega._version, p.device)
        cached = self._keep.get(p)
        if cached is None or cached[0] != key:
            eta = group["lr"] / (1.0 - group["momentum"])  # the effective step of heavy-ball momentum
            c = omega * (eta * 2.0 * group["reg_lambda"])
            cached = self._keep[p] = (key, c.add_(1.0).reciprocal_())
        return cached[1]

    def _use_compiled(self, params: list) -> bool:
        if self.fused == "auto":
            return sum(p.numel() for p in params) >= COMPILE_MIN_NUMEL
        return self.fused == "compile"

    def _compiled_anchored_step(self, params, grads, omegas, theta_stars, group, reg2, proximal) -> None:
        # Momentum 0 is the same update with a buffer that is reset to zero each step.
        bufs = self._momentum_buffers(params)
        device = params[0].device
        # 0-d tensors, not floats: a new learning rate must not trigger a recompilation.
        scalars = [
            torch.tensor(v, dtype=params[0].dtype, device=device)
            for v in (group["lr"], group["momentum"], group["weight_decay"], reg2)
        ]
        _compiled_step()(params, grads, bufs, omegas, theta_stars, *scalars, proximal)


def _eager_explicit_step(p, g, omega, theta_star, buf, d_p, group: dict, reg2: float) -> None:
    """SGD on g + 2 lambda Omega (theta - theta*) + wd theta, with ``d_p`` as scratch."""
    torch.sub(p, theta_star, out=d_p)  # theta - theta*
    torch.addcmul(g, omega, d_p, value=reg2, out=d_p)  # Eq. 3: g + 2 lambda Omega (theta - theta*)
    if group["weight_decay"] > 0:
        d_p.add_(p, alpha=group["weight_decay"])
    if buf is not None:
        d_p = buf.mul_(group["momentum"]).add_(d_p)
    p.add_(d_p, alpha=-group["lr"])


def _eager_proximal_step(p, g, keep, theta_star, buf, scratch, group: dict, reg2: float) -> None:
    """SGD on g + wd theta, giving v, then the proximal map of lambda Omega (theta - theta*)^2 with step
    eta = lr / (1 - m) (see LocalSgd): u = (v + c theta*) / (1 + c) = theta* + (v - theta*) * keep,
    keep = 1 / (1 + c), c = 2 eta lambda Omega, elementwise. ``scratch`` holds g + wd theta."""
    d_p = torch.add(g, p, alpha=group["weight_decay"], out=scratch) if group["weight_decay"] > 0 else g
    if buf is not None:
        d_p = buf.mul_(group["momentum"]).add_(d_p)
    p.add_(d_p, alpha=-group["lr"])  # v = theta - lr * buf
    p.sub_(theta_star).mul_(keep).add_(theta_star)


class OmegaUpdate(Optimizer):
    """Accumulates MAS importance from gradients: a running mean over samples of |g|.

    After the backward pass of  sum_k ||F(x_k)||_2^2  over a batch of ``batch_size``
    samples, ``step(batch_size=...)`` updates, for every parameter with a gradient,

        Omega <- (n * Omega + |g|) / (n + batch_size),   n <- n + batch_size,

    so that after N samples Omega = (1/N) * sum over batches of |g_batch| (Eq. 2 with
    the gradient of a whole batch in place of each sample's: the authors' batch estimator).
    The result is in ``state[p]["omega"]``; nothing is changed in the parameters.
    """

    def __init__(self, params: Iterable) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None, *, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["omega"] = torch.zeros_like(p)
                    state["num_samples"] = 0
                state["num_samples"] = running_mean_(state["omega"], p.grad, state["num_samples"], batch_size)
        return loss
