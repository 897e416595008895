"""Mamba and Mamba-2 blocks run on a chunk of tokens that continues their cached states
(``mamba_chunk``): what self-speculation's verify pass and the ``catch_up`` cache strategy run."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN


def mamba_chunk(block: nn.Module, h: Tensor, conv: Tensor, ssm: Tensor,
                lead: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Run an HF ``MambaBlock`` or ``Mamba2Block`` on the w tokens h (r, w, d) that follow the
    states conv (r, C, K) and ssm: its output (r, w, d) and the states after each token (w of each).

    HF's Mamba mixer restarts the recurrence from zero on a multi-token call, and both mixers keep
    only the last state; this pass continues from the given states and keeps all of them. The
    projections run once on the chunk; the conv window and the recurrence step token by token with
    the arithmetic of HF's one-token update, so a chunk gives what w one-token calls give.

    ``lead`` (r,) makes the chunk ragged: row i's tokens are its last w - lead[i] columns, and its
    first lead[i] columns are padding. The conv reads the row's own state right before its first
    token, and the step size is zero at padding, which leaves the recurrent state as it was; the
    outputs (and per-token states) at padding are meaningless, the last states are the row's.
    """
    m = block.mixer
    residual = h
    x = block.norm(h.to(dtype=block.norm.weight.dtype))
    if block.residual_in_fp32:
        residual = residual.to(torch.float32)
    mamba2 = hasattr(m, "n_groups")
    proj = m.in_proj(x)
    if mamba2:
        gate, xbc, dt = proj.split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
        xbc = xbc.transpose(1, 2)
    else:
        xbc, gate = proj.transpose(1, 2).chunk(2, dim=1)  # (r, C, w) each
    kernel = conv.shape[-1]
    window = torch.cat([conv.to(xbc.dtype), xbc], dim=-1).to(m.conv1d.weight.dtype)  # (r, C, K + w)
    live = None
    if lead is not None:  # row i's inputs, right-aligned: [padding, its conv state, its tokens]
        t = torch.arange(window.shape[-1], device=window.device)[None]
        o = lead.to(window.device)[:, None]
        src = torch.where(t < o + kernel, (t - o).clamp(min=0), t)  # (r, K + w)
        window = window.gather(-1, src[:, None].expand(-1, window.shape[1], -1))
        live = (torch.arange(h.shape[1], device=window.device)[None] >= o).float()  # (r, w)
    # token j's conv reads the K inputs window[j+1 : j+1+K] (a depthwise conv; unfolded, as a
    # convolution call costs more than the arithmetic at these sizes)
    mixed = (window.unfold(-1, kernel, 1)[:, :, 1:] * m.conv1d.weight[:, None, 0]).sum(-1)  # (r, C, w)
    if m.conv1d.bias is not None:
        mixed = mixed + m.conv1d.bias[:, None]
    if m.activation is not None:
        mixed = ACT2FN[m.activation](mixed)
    xs = mixed.to(xbc.dtype).transpose(1, 2)  # (r, w, C)
    convs = [window[..., j + 1:j + 1 + kernel].to(conv.dtype) for j in range(h.shape[1])]
    ys, ssms = _mamba2_scan(m, xs, dt, ssm, live) if mamba2 else _mamba_scan(m, xs, gate, ssm, live)
    y = torch.stack(ys, dim=1)
    if mamba2:
        y = m.norm(y, gate)
    return residual + m.out_proj(y.to(x.dtype)), convs, ssms


def _mamba_scan(m: nn.Module, xs: Tensor, gate: Tensor, ssm: Tensor,
                live: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Mamba's selective recurrence over xs (r, w, C) from ssm (r, C, N), as HF's one-token update
    (the element-wise terms of every token at once, then the recurrence token by token); the step
    size is zeroed where ``live`` (r, w) is 0."""
    step, B, Cm = torch.split(m.x_proj(xs), [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
    dt = (m.dt_proj.weight @ step.transpose(1, 2)).transpose(1, 2)  # (r, w, C)
    if m.dt_proj.bias is not None:
        dt = dt + m.dt_proj.bias.float().to(dt.dtype)
    dt = F.softplus(dt).float()[..., None]  # (r, w, C, 1)
    if live is not None:
        dt = dt * live[:, :, None, None]
    dA = torch.exp(dt * -torch.exp(m.A_log.float()))  # (r, w, C, N)
    dBx = dt * B.float()[:, :, None, :] * xs.float()[..., None]
    state, ssms, news = ssm, [], []
    for j in range(xs.shape[1]):
        new = state.float() * dA[:, j] + dBx[:, j]
        state = new.to(ssm.dtype)
        ssms.append(state)
        news.append(new.to(Cm.dtype))
    y = torch.matmul(torch.stack(news, dim=1), Cm.unsqueeze(-1)).squeeze(-1) + xs * m.D  # (r, w, C)
    y = (y * F.silu(gate.transpose(1, 2))).to(xs.dtype)
    return list(y.unbind(1)), ssms


def _mamba2_scan(m: nn.Module, xs: Tensor, dt: Tensor, ssm: Tensor,
                 live: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Mamba-2's multi-head recurrence over xs (r, w, C) from ssm (r, H, P, N), as HF's one-token
    update (the gated norm is applied by the caller); the step size is zeroed where ``live`` is 0."""
    r, heads, hd, n, groups = xs.shape[0], m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups
    x, B, Cm = torch.split(xs, [m.intermediate_size, groups * n, groups * n], dim=-1)
    A = (-torch.exp(m.A_log.float()))[:, None, None].expand(-1, hd, n)
    D = m.D[:, None].expand(-1, hd)
    bias = m.dt_bias[:, None].expand(-1, hd)
    state, ssms, ys = ssm, [], []

    def per_head(t: Tensor, shape: tuple) -> Tensor:  # (r, G*N) -> each head's group
        return t.reshape(r, groups, 1, n).expand(r, groups, heads // groups, n).contiguous().reshape(*shape)

    for j in range(xs.shape[1]):
        hj = x[:, j].reshape(r, heads, hd)
        dtj = F.softplus(dt[:, j][..., None].expand(-1, -1, hd) + bias.to(dt.dtype))[..., None]
        if live is not None:
            dtj = dtj * live[:, j, None, None, None].to(dtj.dtype)
        new = state * torch.exp(dtj.float() * A.float()) + dtj * per_head(B[:, j], (r, heads, 1, n)) * hj[..., None]
        state = new.to(ssm.dtype)
        ssms.append(state)
        out = torch.bmm(new.to(Cm.dtype).view(r * heads, hd, n), per_head(Cm[:, j], (r * heads, n, 1)))
        out = out.view(r, heads, hd)
        ys.append((out + hj * D).to(out.dtype).to(hj.dtype).reshape(r, -1))
    return ys, ssms
