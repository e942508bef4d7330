"""Pictures of growth, headless (matplotlib's Agg backend): a strip of snapshots (PNG), an
animation of growth, cut and regrowth (GIF) and the training curves (PNG).

A cell is drawn where it is opaque (alpha > 0.5), in its own RGB colour (clipped to [0, 1]),
as a voxel seen from above at an angle; the depth axis d points up.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .targets import occupied

_VIEW = dict(elev=28, azim=-58)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_voxels(ax, state: torch.Tensor, title: str | None = None):
    """Draws the opaque cells of one state ([D, H, W, C >= 4]) on a 3D axis."""
    filled = occupied(state)
    # ax.voxels indexes (x, y, z): put w on x, h on y, d (depth) up.
    filled = filled.permute(2, 1, 0).numpy()
    colours = torch.zeros(*filled.shape, 4)
    colours[..., :3] = state[..., :3].clamp(0, 1).permute(2, 1, 0, 3)
    colours[..., 3] = 1.0
    D, H, W = state.shape[:3]
    if filled.any():
        ax.voxels(filled, facecolors=colours.numpy(), edgecolor=(0, 0, 0, 0.15), linewidth=0.3)
    ax.set(xlim=(0, W), ylim=(0, H), zlim=(0, D))
    ax.set_box_aspect((W, H, D), zoom=1.3)
    ax.view_init(**_VIEW)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def snapshots(panels: list[tuple[str, torch.Tensor]], path: str | Path, title: str | None = None):
    """One row of voxel views, one per ``(caption, state)``."""
    plt = _plt()
    fig = plt.figure(figsize=(2.0 * len(panels), 2.4))
    for i, (caption, state) in enumerate(panels):
        draw_voxels(fig.add_subplot(1, len(panels), i + 1, projection="3d"), state, caption)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.8, wspace=0)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def animation(frames: list[tuple[str, torch.Tensor]], path: str | Path, fps: int = 8, size: float = 3.0,
              dpi: int = 72):
    """An animated GIF, one ``(caption, state)`` per frame; the last frame is held a second."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    plt = _plt()
    fig = plt.figure(figsize=(size, size))
    ax = fig.add_subplot(projection="3d")
    fig.subplots_adjust(0, 0, 1, 0.92)
    order = list(range(len(frames))) + [len(frames) - 1] * fps

    def show(i):
        ax.clear()
        caption, state = frames[order[i]]
        draw_voxels(ax, state, caption)

    FuncAnimation(fig, show, frames=len(order)).save(path, writer=PillowWriter(fps=fps), dpi=dpi)
    plt.close(fig)


def training_curves(records: list[dict], path: str | Path, title: str):
    """The RGBA and overflow losses (log scale) and the batch IoU against the step."""
    plt = _plt()
    train = [r for r in records if r.get("kind") == "train"]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in train]
    for key in ("rgba_loss", "overflow_loss"):
        ax_loss.plot(steps, [max(r[key], 1e-12) for r in train], label=key)
    ax_loss.set(xlabel="step", ylabel="loss", title="losses", yscale="log")
    ax_loss.legend(fontsize=8)
    ax_iou.plot(steps, [r["iou"] for r in train])
    ax_iou.set(xlabel="step", ylabel="IoU", title="IoU of the batch's final states", ylim=(0, 1))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
