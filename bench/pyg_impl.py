"""The lattice step as a PyTorch Geometric ``MessagePassing`` layer (the route the earlier
project planned): the lattice is a graph whose edges ``nbr(i, k) -> i`` carry the token index
``k`` as their type, the message is ``w_sp[k] * vn[j]`` and the aggregation a sum. A ``zero``
boundary is simply missing edges; ``periodic`` wraps them. The rest of the cell (layer norms,
in-projection, GELU, out-projection, fire mask) is ordinary PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch_geometric.nn import MessagePassing

from cube_kernels.neighbourhood import offsets
from cube_kernels.philox import fire_mask
from cube_kernels.spec import LN_EPS

from .config import Config


def lattice_graph(depth: int, height: int, width: int, neighbourhood: str, boundary: str,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(edge_index [2, E], edge_type [E])`` with edges from ``nbr(i, k)`` to ``i`` of type ``k``."""
    d, h, w = torch.meshgrid(torch.arange(depth), torch.arange(height), torch.arange(width), indexing="ij")
    d, h, w = d.reshape(-1), h.reshape(-1), w.reshape(-1)
    target = (d * height + h) * width + w
    sources, targets, types = [], [], []
    for k, (dd, dh, dw) in enumerate(offsets(neighbourhood)):
        nd, nh, nw = d + dd, h + dh, w + dw
        if boundary == "periodic":
            nd, nh, nw = nd % depth, nh % height, nw % width
            inside = torch.ones_like(target, dtype=torch.bool)
        else:
            inside = ((nd >= 0) & (nd < depth) & (nh >= 0) & (nh < height) & (nw >= 0) & (nw < width))
        sources.append(((nd * height + nh) * width + nw)[inside])
        targets.append(target[inside])
        types.append(torch.full((int(inside.sum()),), k, dtype=torch.long))
    edge_index = torch.stack([torch.cat(sources), torch.cat(targets)])
    return edge_index.to(device), torch.cat(types).to(device)


class SpatialGating(MessagePassing):
    """``g[i] = b_sp + sum over edges (j -> i, type k) of w_sp[k] * vn[j]`` on ``[B, N, F]``."""

    def __init__(self):
        super().__init__(aggr="sum", node_dim=-2)

    def forward(self, vn, edge_index, edge_type, w_sp, b_sp):
        return b_sp + self.propagate(edge_index, x=vn, w_edge=w_sp[edge_type])

    def message(self, x_j, w_edge):
        return w_edge * x_j


def make_rollout(cfg: Config, device: str = "cpu"):
    """``rollout(x, params)`` of ``cfg.steps`` steps on ``[B, D, H, W, C]`` states."""
    edge_index, edge_type = lattice_graph(cfg.depth, cfg.height, cfg.width, cfg.neighbourhood,
                                          cfg.boundary, device)
    gating = SpatialGating()
    C, Fh = cfg.channels, cfg.hidden

    def step(x, p, t):
        B, N = x.shape[0], cfg.cells
        y = F.layer_norm(x, (C,), p["ln1_weight"], p["ln1_bias"], LN_EPS)
        u, v = F.gelu(F.linear(y, p["w_in"].t(), p["b_in"])).split(Fh, dim=-1)
        vn = F.layer_norm(v, (Fh,), p["ln2_weight"], p["ln2_bias"], LN_EPS)
        g = gating(vn, edge_index, edge_type, p["w_sp"], p["b_sp"])
        delta = F.linear(u * g, p["w_out"].t(), p["b_out"])
        if cfg.fire_rate < 1.0:
            m = fire_mask(cfg.seed, t, B, N, cfg.fire_rate, x.device).view(B, N, 1)
            delta = delta * m.to(delta.dtype)
        return x + delta

    def rollout(x, params):
        shape = x.shape
        x = x.reshape(shape[0], cfg.cells, C)
        for t in range(cfg.steps):
            x = step(x, params, t)
        return x.reshape(shape)
    return rollout
