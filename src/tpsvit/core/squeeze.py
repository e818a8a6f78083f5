"""The TPS squeeze: every pruned token picks its most similar reserved token (its host) and each host becomes a
similarity-weighted mean of itself (weight e) and the pruned tokens that chose it (weight exp(cos / temperature)).

Two execution paths share the same arithmetic:

* :func:`squeeze` / :func:`squeeze_with_hosts` -- the gather path: reserved and pruned tokens as separate tensors.
* :func:`squeeze_masked` -- the full-length path of dTPS training: one sequence with keep masks, same result on the
  reserved rows.

Similarities and weights are computed in float32 whatever the input dtype, and with autocast off (under autocast a
``.float()`` before ``@`` would still run the product in bf16/fp16 and change host choices); weights are shifted by
their maximum so that small temperatures cannot overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def squeeze_with_hosts(reserved: Tensor, pruned: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Squeeze ``pruned`` (B, Np, C) into ``reserved`` (B, Nr, C); also return each pruned token's host (B, Np).

    Host indices index ``reserved``. Reserved tokens that no pruned token chose are returned bit-for-bit unchanged.
    """
    _check_pair(reserved, pruned, temperature)
    if pruned.shape[1] == 0:
        return reserved, torch.zeros(pruned.shape[:2], dtype=torch.long, device=pruned.device)
    with full_precision(reserved):
        similarity = (_unit(pruned) @ _unit(reserved).transpose(1, 2)) / temperature  # (B, Np, Nr)
        logits, host = similarity.max(dim=-1)
        fused, count = _fuse(reserved, pruned, host, logits, None)
    fused = torch.where(count.unsqueeze(-1) > 0, fused.to(reserved.dtype), reserved)
    return fused, host


def squeeze(reserved: Tensor, pruned: Tensor, temperature: float = 1.0) -> Tensor:
    """The TPS squeeze (paper Sec. "Squeeze"): (B, Nr, C) reserved and (B, Np, C) pruned tokens -> (B, Nr, C).

    Each pruned token p_i picks its host h(i) = argmax_j cos(p_i, r_j); with c_ij = cos(p_i, r_j) / temperature
    each reserved token becomes (e * r_j + sum_{h(i)=j} exp(c_ij) * p_i) / (e + sum_{h(i)=j} exp(c_ij)).
    """
    return squeeze_with_hosts(reserved, pruned, temperature)[0]


def squeeze_masked(tokens: Tensor, keep: Tensor, prev_keep: Tensor, temperature: float = 1.0) -> Tensor:
    """Full-length squeeze used while training dTPS: one sequence, keep masks instead of gathers.

    Args:
        tokens: (B, N, C) patch tokens (no prefix tokens).
        keep: (B, N) keep decisions after this location, 0/1 values (may carry straight-through gradients).
        prev_keep: (B, N) keep decisions before this location; tokens with ``(1 - keep) * prev_keep == 1`` are
            squeezed now (the release's product form, whose straight-through gradient reaches both masks).
        temperature: similarity temperature.

    Returns:
        (B, N, C): kept rows equal :func:`squeeze` of (kept, pruned-now) tokens; other rows are unchanged. Hosts are
        restricted to kept tokens, a token never hosts itself, and tokens pruned earlier take no part.
    """
    if tokens.dim() != 3 or keep.shape != tokens.shape[:2] or prev_keep.shape != tokens.shape[:2]:
        raise ValueError(
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
        pruned_now = (1.0 - keep) * prev_keep
        fused, _ = _fuse(tokens, tokens, host, logits, pruned_now)
    return fused.to(tokens.dtype)


def _check_pair(reserved: Tensor, pruned: Tensor, temperature: float) -> None:
    if reserved.dim() != 3 or pruned.dim() != 3:
        raise ValueError(
            f"squeeze expects reserved (B, Nr, C) and pruned (B, Np, C); got {tuple(reserved.shape)} "
            f"and {tuple(pruned.shape)}"
        )
    if reserved.shape[0] != pruned.shape[0] or reserved.shape[2] != pruned.shape[2]:
        raise ValueError(
            f"reserved {tuple(reserved.shape)} and pruned {tuple(pruned.shape)} must share batch and channel sizes"
        )
    if reserved.shape[1] == 0 and pruned.shape[1] > 0:
        raise ValueError("squeeze needs at least one reserved token to host the pruned ones")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
