"""Importance estimators: Omega for every trainable parameter of the shared trunk.

An estimator is a pure function ``(model, loader, device) -> {param_name: Omega}`` over the
trainable parameters of ``model.shared``; ``model`` is the trunk with the head of the task
just trained, F(x) = head(shared(x)), and is scored in eval mode.

Memory Aware Synapses (Aljundi et al., ECCV 2018):

- ``mas_batch_importance``: the authors' default. It back-propagates the batch sum
  sum_k ||F(x_k)||_2^2 and averages |gradient of the batch| over samples: the absolute value
  is taken after summing over a batch, |sum_k g_k| <= sum_k |g_k|, so it equals Eq. 2 only with
  batch size 1 and otherwise depends on the batch size.
- ``mas_per_sample_importance``: Eq. 2 and 4 exactly, Omega = (1/N) sum_k |d ||F(x_k)||_2^2 / d theta|,
  at the cost of one batched backward pass (see "Per-sample sums" below).
- ``local_mas_importance``: the local (Hebbian) variant of Sec. 4, each layer on its own.

Baselines sharing the same machinery:

- ``ewc_fisher``: EWC's diagonal empirical Fisher (Kirkpatrick et al., PNAS 2017),
  (1/N) sum_k (d log p(y_k | x_k) / d theta)^2.
Synaptic Intelligence's importance comes from the optimizer's path integral, not from data: it
lives with the method, in ``methods/si.py``.

Per-sample sums. In eval mode the samples of a batch do not interact, so one backward pass of
the batch-summed loss gives every sample's gradient G_k at the output of each layer. With the
layer's input X_k captured by a forward hook, the per-sample weight gradient of a Linear layer
is the outer product G_k X_k^T, hence exactly

    sum_k |G_k X_k^T|   = |G|^T |X|         (MAS: power 1)
    sum_k (G_k X_k^T)^2 = (G^2)^T (X^2)     (EWC: power 2)

and the bias term is sum_k |G_k|^p. For a convolution the per-sample weight gradient is
G_k U_k^T with U_k the unfolded input; it is formed in chunks of samples (bounded memory),
raised to the power and summed. Any other parameter falls back to ``torch.func``
(``functional_call`` + ``vmap(grad)``), chunked. No per-sample gradient is ever stored for a
whole batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_class import trainable_parameters
from utils.runtime import distributed

Importance = dict[str, torch.Tensor]
BatchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh)
CHUNK_ELEMENTS = 2**24  # unfolded inputs, or torch.func per-sample gradients, formed at once: 64 MB


def _squared_output_norm(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return outputs.pow(2).sum()  # Eq. 4, summed over the batch: sum_k ||F(x_k)||_2^2


def _negative_log_likelihood(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, labels, reduction="sum")  # -sum_k log p(y_k | x_k)


def running_mean_(omega: torch.Tensor, grad: torch.Tensor, seen: int, batch_size: int) -> int:
    """Omega <- (n * Omega + |g|) / (n + batch_size) in place; returns n + batch_size.

    After N samples Omega = (1/N) * sum over batches of |g_batch| (Eq. 2 with the gradient of a
    whole batch in place of each sample's: the authors' ``MAS_Omega_update``)."""
    total = seen + batch_size
    omega.mul_(seen / total).add_(grad.abs(), alpha=1.0 / total)
    return total


def mas_batch_importance(model: nn.Module, loader: DataLoader, device: torch.device) -> Importance:
    """Omega = (1/N) sum over batches of | d/dtheta sum_{k in batch} ||F(x_k)||_2^2 | (authors' estimator)."""
    params = trainable_parameters(model.shared)
    omega = {name: torch.zeros_like(p) for name, p in params.items()}
    seen = 0
    model.eval()
    for inputs, labels in tqdm(loader, desc="importance (batch)", leave=False, disable=None):
        model.zero_grad(set_to_none=True)
        _squared_output_norm(model(inputs.to(device)), labels).backward()
        with torch.no_grad():
            for name, p in params.items():  # a parameter the output does not depend on has no gradient
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                running_mean_(omega[name], grad, seen, inputs.shape[0])
        seen += inputs.shape[0]
    model.zero_grad(set_to_none=True)
    if distributed.active():  # each rank's running mean back to its sum, then the mean over all samples
        return _mean_over_samples({name: o.mul_(seen) for name, o in omega.items()}, seen)
    return {name: o.cpu() for name, o in omega.items()}


def mas_per_sample_importance(model: nn.Module, loader: DataLoader, device: torch.device) -> Importance:
    """Eq. 2 exactly: Omega = (1/N) sum_k | d ||F(x_k)||_2^2 / d theta |."""
    return _per_sample_mean(model, loader, device, _squared_output_norm, power=1, desc="importance (per sample)")


def ewc_fisher(model: nn.Module, loader: DataLoader, device: torch.device) -> Importance:
    """EWC's diagonal empirical Fisher: (1/N) sum_k (d log p(y_k | x_k) / d theta)^2, true labels."""
    return _per_sample_mean(model, loader, device, _negative_log_likelihood, power=2, desc="Fisher")


# --------------------------------------------------------------------------- per-sample sums


@contextlib.contextmanager
def _no_inplace(model: nn.Module) -> Iterator[None]:
    """In-place activations would overwrite the layer outputs the hooks keep."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False)]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


def _hookable(module: nn.Module) -> bool:
    """Layers whose per-sample gradients have a closed form here."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _layers(shared: nn.Module) -> dict[str, nn.Module]:
    """Hookable layers of ``shared`` that own trainable parameters, by module name."""
    return {
        name: m
        for name, m in shared.named_modules()
        if _hookable(m) and any(p.requires_grad for p in m.parameters(recurse=False))
    }


class _Taps:
    """Forward hooks that keep each layer's input and output for one forward pass."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def keep(module, args, output):
            if name in self.outputs:
                raise ValueError(f"layer {name} runs twice in one forward pass; per-sample sums need one call")
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output

        return keep

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _power_sum(t: torch.Tensor, power: int, dim: int = 0) -> torch.Tensor:
    """sum |t|^power over ``dim``."""
    return t.abs().sum(dim) if power == 1 else t.square().sum(dim)


def _accumulate_layer(
    module: nn.Module, x: torch.Tensor, g: torch.Tensor, power: int, totals: dict[str, torch.Tensor]
) -> None:
    """totals[k] += sum over the batch of |per-sample gradient|^power, for k in ("weight", "bias"),
    from the layer's inputs x and the gradients g at its output."""
    if isinstance(module, nn.Linear):
        # sum_k |g_k x_k^T|^p = (|G|^p)^T (|X|^p), since |g_i x_j|^p = |g_i|^p |x_j|^p
        gp, xp = (g.abs(), x.abs()) if power == 1 else (g.square(), x.square())
        if "weight" in totals:
            totals["weight"].addmm_(gp.T, xp)
        if "bias" in totals:
            totals["bias"] += gp.sum(0)
        return
    g = g.flatten(2)  # (B, Cout, L)
    if "weight" in totals:
        _accumulate_conv_weight(module, x, g, power, totals["weight"].view(g.shape[1], -1))
    if "bias" in totals:
        totals["bias"] += _power_sum(g.sum(2), power)


def _accumulate_conv_weight(
    module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, power: int, weight: torch.Tensor
) -> None:
    """weight += sum_k |g_k u_k^T|^power, u_k the unfolded input of sample k, unfolded a chunk at a time."""
    per_sample = torch.empty_like(weight)
    kernel_elements = weight.shape[1] * g.shape[2]  # CinKK * L: one sample's unfolded input
    chunk = max(1, CHUNK_ELEMENTS // kernel_elements)
    for start in range(0, g.shape[0], chunk):
        unfolded = (
            F.unfold(x[start : start + chunk], module.kernel_size, module.dilation, module.padding, module.stride)
            .transpose(1, 2)
            .contiguous()
        )  # (chunk, L, CinKK)
        # One sample at a time keeps the (Cout, CinKK) product in cache: a batch of them is memory-bound.
        for k, u in enumerate(unfolded, start=start):
            torch.mm(g[k], u, out=per_sample)  # the weight gradient of sample k
            weight += per_sample.abs_() if power == 1 else per_sample.square_()


def _fallback_sums(model, others: dict[str, nn.Parameter], inputs, labels, batch_loss: BatchLoss, power: int):
    """sum_k |per-sample gradient|^power for parameters outside Linear/Conv2d layers, by vmap(grad)."""
    frozen = {f"shared.{n}": p.detach() for n, p in model.shared.named_parameters() if n not in others}
    frozen.update({f"head.{n}": p.detach() for n, p in model.head.named_parameters()})
    frozen.update({n: b for n, b in model.named_buffers()})

    def sample_loss(params, x, y):
        out = functional_call(model, {**frozen, **{f"shared.{n}": p for n, p in params.items()}}, (x[None],))
        return batch_loss(out, y[None])

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    params = {n: p.detach() for n, p in others.items()}
    chunk = max(1, CHUNK_ELEMENTS // max(1, sum(p.numel() for p in params.values())))
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, inputs.shape[0], chunk):
        grads = per_sample_grad(params, inputs[start : start + chunk], labels[start : start + chunk])
        for n in sums:
            sums[n] += _power_sum(grads[n], power)
    return sums


def _qualified(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _layer_totals(layer_name: str, layer: nn.Module, totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``totals`` that belong to one layer, by its own parameter names."""
    return {
        k: totals[_qualified(layer_name, k)]
        for k, _ in layer.named_parameters(recurse=False)
        if _qualified(layer_name, k) in totals
    }


def _accumulate_batch(
    model, layers, taps, others, inputs, labels, batch_loss: BatchLoss, power: int, totals: dict[str, torch.Tensor]
) -> None:
    """Per-sample sums of one batch: one forward, one backward to the layer outputs, closed forms."""
    taps.clear()
    loss = batch_loss(model(inputs), labels)
    names = list(taps.outputs)
    output_grads = torch.autograd.grad(loss, [taps.outputs[n] for n in names]) if names else []
    with torch.no_grad():
        for name, g in zip(names, output_grads):
            _accumulate_layer(layers[name], taps.inputs[name], g, power, _layer_totals(name, layers[name], totals))
        taps.clear()
        if others:
            for n, total in _fallback_sums(model, others, inputs, labels, batch_loss, power).items():
                totals[n] += total


def _hooked_mean(
    model: nn.Module, loader: DataLoader, device: torch.device, desc: str, no_grad: bool, accumulate: Callable
) -> Importance:
    """The scaffolding of the hook-based estimators: eval mode, forward hooks on the layers with
    trainable parameters, no in-place activations, running totals divided by the number of samples.
    ``accumulate(inputs, labels, layers, taps, totals)`` adds one batch's sums to ``totals``."""
    params = trainable_parameters(model.shared)
    layers = _layers(model.shared)
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    model.eval()
    taps = _Taps(layers)
    try:
        with _no_inplace(model), torch.no_grad() if no_grad else contextlib.nullcontext():
            for inputs, labels in tqdm(loader, desc=desc, leave=False, disable=None):
                accumulate(inputs.to(device), labels.to(device), layers, taps, totals)
                seen += inputs.shape[0]
    finally:
        taps.remove()
    return _mean_over_samples(totals, seen)


def _mean_over_samples(totals: dict[str, torch.Tensor], seen: int) -> Importance:
    """totals / seen; with several ranks (torchrun), each scored its own shard: both are summed
    over the ranks first, so the mean is over every sample once."""
    if distributed.active():
        count = torch.tensor([float(seen)], dtype=torch.float64, device=next(iter(totals.values())).device)
        distributed.sum_([*totals.values(), count])
        seen = int(count.item())
    return {n: (t / max(seen, 1)).cpu() for n, t in totals.items()}


def _uncovered(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters outside the hookable layers (served by the torch.func fallback)."""
    layers = _layers(model.shared)
    covered = {_qualified(m, k) for m, layer in layers.items() for k, _ in layer.named_parameters(recurse=False)}
    return {n: p for n, p in trainable_parameters(model.shared).items() if n not in covered}


def _per_sample_mean(
    model: nn.Module, loader: DataLoader, device: torch.device, batch_loss: BatchLoss, power: int, desc: str
) -> Importance:
    """(1/N) sum_k |d loss_k / d theta|^power for every trainable parameter of ``model.shared``."""
    others = _uncovered(model)

    def accumulate(inputs, labels, layers, taps, totals):
        _accumulate_batch(model, layers, taps, others, inputs, labels, batch_loss, power, totals)

    return _hooked_mean(model, loader, device, desc, no_grad=False, accumulate=accumulate)


# --------------------------------------------------------------------------- local (Hebbian) MAS


def _activations_after(shared: nn.Module) -> dict[str, nn.Module]:
    """For each layer inside an nn.Sequential, the activation module right after it (if any)."""
    found = {}
    for parent_name, parent in shared.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, _), (_, following) in zip(children, children[1:]):
            if isinstance(following, ACTIVATIONS):
                found[_qualified(parent_name, name)] = following
    return found


def _local_output_grad(z: torch.Tensor, activation: nn.Module | None) -> torch.Tensor:
    """d ||y||_2^2 / dz for y = activation(z): 2 y activation'(z) (2 z without an activation)."""
    if activation is None:
        return 2 * z
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        y = activation(z.clone())  # clone: an in-place activation must not write into a leaf
        (g,) = torch.autograd.grad(y.pow(2).sum(), z)
    return g


def local_mas_importance(model: nn.Module, loader: DataLoader, device: torch.device) -> Importance:
    """Local MAS (Sec. 4): every layer l is a function of its own, y_l = act(W_l x + b_l), where act is
    the non-linearity that follows the layer (identity if none) and the input x is a constant.

        Omega_ij = (1/N) sum_k | d ||y_l(x_k)||_2^2 / d W_ij | = (1/N) sum_k 2 |y_i act'(z_i) x_j|

    For a Linear+ReLU layer, act'(z_i) = 1 wherever y_i != 0, so Omega_ij = mean_k 2 |y_i x_j|: the
    Hebbian product of the activities of the two neurons the weight connects (constant 2 from the
    square). Biases see x_j = 1. Convolutions sum the product over the positions a weight is used at,
    per sample, before the absolute value. Only a forward pass is needed.
    """
    others = _uncovered(model)
    if others:
        raise ValueError(f"local MAS needs Linear/Conv2d layers; {sorted(others)[0]} is in neither")
    activations = _activations_after(model.shared)

    def accumulate(inputs, labels, layers, taps, totals):
        taps.clear()
        model(inputs)
        for name, layer in layers.items():
            g = _local_output_grad(taps.outputs[name], activations.get(name))
            _accumulate_layer(layer, taps.inputs[name], g, 1, _layer_totals(name, layer, totals))

    return _hooked_mean(model, loader, device, "importance (local)", no_grad=True, accumulate=accumulate)
