"""The TPS squeeze: every pruned token picks its most similar reserved token (its host) and each host becomes a
similarity-weighted mean of itself (weight e) and the pruned tokens that chose it (weight exp(cos / temperature)).

Two execution paths share the same arithmetic:

* :func:`squeeze` / :func:`squeeze_with_hosts` -- the gather path: reserved and pruned tokens as separate tensors.
* :func:`squeeze_masked` -- the full-length path of dTPS training: one sequence with keep masks, same result on the
  reserved rows.

Similarities and weights are computed in float32 whatever the input dtype, and with autocast off (under autocast a
``.float()`` before ``@`` would still run the product in bf16/fp16 and change host choices); weights are shifted by
their maximum so that small temperatures cannot overflow.

Beyond the paper, both paths take two options (off by default, and then the result is exactly the paper's):
``floor`` -- a pruned token whose best host has cosine similarity below it is not squeezed (its host is -1), and
``log_weight`` -- a per-donor log-weight added to ``cos / temperature`` (the importance-weighted squeeze,
:func:`importance_log_weight`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tpsvit.errors import InvalidArgumentError

NORM_EPS = 1e-6


def full_precision(x: Tensor):
    """Autocast off on ``x``'s device for the block: products of float32 inputs then really run in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _unit(x: Tensor) -> Tensor:
    x = x.float()
    return x / (x.norm(dim=-1, keepdim=True) + NORM_EPS)


def _fuse(hosts: Tensor, donors: Tensor, host_index: Tensor, logits: Tensor, donor_mask: Tensor | None) -> Tensor:
    """Weighted mean of each host (logit 1) and the donors that chose it (their ``logits``), in float32.

    hosts (B, K, C); donors (B, P, C); host_index, logits (B, P) (a non-finite logit: no host); donor_mask (B, P) or
    None. With a mask m (0/1 values carrying the straight-through gradient of the keep decisions in training), every
    token with a host weighs ``exp(m * c) * m`` as in the authors' release: the same values as ``exp(c)`` on m = 1 and
    0 elsewhere, and the release's gradient d/dm = ``exp(c) * (1 + c)`` on m = 1 and 1 on m = 0 (the token's nearest
    host learns what taking it in would change).
    Returns (fused (B, K, C) float32, number of donors per host (B, K)).
    """
    valid = torch.isfinite(logits)
    donating = valid if donor_mask is None else valid & (donor_mask.detach() > 0)
    index = host_index.masked_fill(~valid, 0)
    safe_logits = torch.where(valid, logits, torch.zeros_like(logits)).float()
    # Per host, weights are taken relative to the largest logit among itself (1) and its donors: no overflow.
    shift = torch.ones(hosts.shape[:2], dtype=torch.float32, device=hosts.device)
    shift = shift.scatter_reduce(1, index, torch.where(donating, safe_logits, shift.new_ones(())), "amax").detach()
    self_weight = torch.exp(1.0 - shift)  # (B, K)
    if donor_mask is not None:
        mask = donor_mask.float()
        safe_logits = safe_logits * mask
    weight = torch.where(valid, torch.exp(safe_logits - shift.gather(1, index)), torch.zeros_like(safe_logits))
    if donor_mask is not None:
        weight = weight * mask
    channels = hosts.shape[-1]
    numer = (self_weight.unsqueeze(-1) * hosts.float()).scatter_add(
        1, index.unsqueeze(-1).expand(-1, -1, channels), weight.unsqueeze(-1) * donors.float()
    )
    denom = self_weight.scatter_add(1, index, weight)
    count = torch.zeros_like(denom).scatter_add(1, index, donating.float())
    return numer / denom.unsqueeze(-1), count


def squeeze_with_hosts(reserved: Tensor, pruned: Tensor, temperature: float = 1.0, *, floor: float | None = None,
                       log_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Squeeze ``pruned`` (B, Np, C) into ``reserved`` (B, Nr, C); also return each pruned token's host (B, Np).

    Host indices index ``reserved``. Reserved tokens that no pruned token chose are returned bit-for-bit unchanged.
    Beyond the paper: with ``floor``, a pruned token whose best cosine is below it is not squeezed and gets host -1;
    ``log_weight`` (B, Np) is added to each donor's logit ``cos / temperature``.
    """
    _check_pair(reserved, pruned, temperature)
    if pruned.shape[1] == 0:
        return reserved, torch.zeros(pruned.shape[:2], dtype=torch.long, device=pruned.device)
    with full_precision(reserved):
        similarity = (_unit(pruned) @ _unit(reserved).transpose(1, 2)) / temperature  # (B, Np, Nr)
        logits, host = similarity.max(dim=-1)
        below = _below_floor(logits, temperature, floor)
        logits = _with_options(logits, below, log_weight)
        fused, count = _fuse(reserved, pruned, host, logits, None)
    fused = torch.where(count.unsqueeze(-1) > 0, fused.to(reserved.dtype), reserved)
    if below is not None:
        host = host.masked_fill(below, -1)
    return fused, host


def _below_floor(logits: Tensor, temperature: float, floor: float | None) -> Tensor | None:
    """(B, P) True where the best cosine (``logits * temperature``) is below ``floor``; None without a floor."""
    if floor is None:
        return None
    return (logits * temperature) < floor


def _with_options(logits: Tensor, below: Tensor | None, log_weight: Tensor | None) -> Tensor:
    """Donor logits with the options applied: -inf (no squeeze) below the floor, plus the donors' log-weights."""
    if log_weight is not None:
        logits = logits + log_weight.float()
    if below is not None:
        logits = logits.masked_fill(below, float("-inf"))
    return logits


def importance(scores: Tensor, alive: Tensor | None = None, log_probs: bool = False) -> Tensor:
    """Each token's share of the importance of the alive tokens, (B, N) summing to 1 over them (0 on dead ones).

    ``scores`` (B, N) are a scorer's (higher = more important): attention or random scores (>= 0) as they are, a
    learned predictor's keep log-probabilities (``log_probs=True``) as probabilities. ``alive`` (B, N) is the mask of
    the tokens alive at the location (None: all). Beyond the paper: the importance-weighted squeeze and the
    similarity floor's fused token use it.
    """
    weight = scores.float().exp() if log_probs else scores.float().clamp_min(0)
    if alive is not None:
        weight = weight * alive.detach().float()
    return weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)


def importance_log_weight(share: Tensor, alive_count: Tensor | int) -> Tensor:
    """log(n * a_i) (B, P) of donor importance shares ``a_i`` (from :func:`importance`), ``n`` tokens alive: 0 for an
    average donor, so the importance-weighted squeeze keeps the paper's weights when every token matters equally."""
    count = alive_count if isinstance(alive_count, int) else alive_count.float().unsqueeze(-1)
    return (share.float() * count).clamp_min(1e-12).log()


def squeeze(reserved: Tensor, pruned: Tensor, temperature: float = 1.0) -> Tensor:
    """The TPS squeeze (paper Sec. "Squeeze"): (B, Nr, C) reserved and (B, Np, C) pruned tokens -> (B, Nr, C).

    Each pruned token p_i picks its host h(i) = argmax_j cos(p_i, r_j); with c_ij = cos(p_i, r_j) / temperature
    each reserved token becomes (e * r_j + sum_{h(i)=j} exp(c_ij) * p_i) / (e + sum_{h(i)=j} exp(c_ij)).
    """
    return squeeze_with_hosts(reserved, pruned, temperature)[0]


def squeeze_masked(tokens: Tensor, keep: Tensor, prev_keep: Tensor, temperature: float = 1.0, *,
                   floor: float | None = None, log_weight: Tensor | None = None,
                   return_below: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Full-length squeeze used while training dTPS: one sequence, keep masks instead of gathers.

    Args:
        tokens: (B, N, C) patch tokens (no prefix tokens).
        keep: (B, N) keep decisions after this location, 0/1 values (may carry straight-through gradients).
        prev_keep: (B, N) keep decisions before this location; tokens with ``(1 - keep) * prev_keep == 1`` are
            squeezed now (the release's product form, whose straight-through gradient reaches both masks).
        temperature: similarity temperature.
        floor, log_weight: the options of :func:`squeeze_with_hosts` (beyond the paper); ``log_weight`` is (B, N).
        return_below: also return the (B, N) mask of the tokens pruned now that the floor kept from being squeezed.

    Returns:
        (B, N, C): kept rows equal :func:`squeeze` of (kept, pruned-now) tokens; other rows are unchanged. Hosts are
        restricted to kept tokens, a token never hosts itself, and tokens pruned earlier take no part.
    """
    if tokens.dim() != 3 or keep.shape != tokens.shape[:2] or prev_keep.shape != tokens.shape[:2]:
        raise InvalidArgumentError(
            f"squeeze_masked expects tokens (B, N, C) and masks (B, N); got {tuple(tokens.shape)}, "
            f"{tuple(keep.shape)}, {tuple(prev_keep.shape)}"
        )
    with full_precision(tokens):
        unit = _unit(tokens)
        similarity = (unit @ unit.transpose(1, 2)) / temperature  # (B, N, N)
        is_host = keep.detach() > 0.5
        eye = torch.eye(tokens.shape[1], dtype=torch.bool, device=tokens.device)
        similarity = similarity.masked_fill(~is_host.unsqueeze(1) | eye, float("-inf"))
        logits, host = similarity.max(dim=-1)
        below = _below_floor(logits, temperature, floor)
        logits = _with_options(logits, below, log_weight)
        pruned_now = (1.0 - keep) * prev_keep
        fused, _ = _fuse(tokens, tokens, host, logits, pruned_now)
    fused = fused.to(tokens.dtype)
    if not return_below:
        return fused
    if below is None:
        return fused, torch.zeros_like(keep, dtype=torch.bool)
    return fused, below & (pruned_now.detach() > 0)


def _check_pair(reserved: Tensor, pruned: Tensor, temperature: float) -> None:
    if reserved.dim() != 3 or pruned.dim() != 3:
        raise InvalidArgumentError(
            f"squeeze expects reserved (B, Nr, C) and pruned (B, Np, C); got {tuple(reserved.shape)} "
            f"and {tuple(pruned.shape)}"
        )
    if reserved.shape[0] != pruned.shape[0] or reserved.shape[2] != pruned.shape[2]:
        raise InvalidArgumentError(
            f"reserved {tuple(reserved.shape)} and pruned {tuple(pruned.shape)} must share batch and channel sizes"
        )
    if reserved.shape[1] == 0 and pruned.shape[1] > 0:
        raise InvalidArgumentError("squeeze needs at least one reserved token to host the pruned ones")
    if not (temperature > 0):
        raise InvalidArgumentError(f"temperature must be > 0, got {temperature!r}")
