"""Draw ``figs/overview.png``: what [CLS]-KD, Manifold Distillation and DeiT's logit KD distil, and where.

Top: the frozen teacher and the student as chains of transformer blocks; the ``--t-id``/``--s-id`` pairs are
joined, with the ALD weight of each pair. Right: the logit terms. Bottom: the feature terms of one pair.
The matrices are illustrations (drawn from a fixed seed), not data::

    python figs/overview.py [--out figs/overview.png]
"""
import argparse
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use('Agg')  # files only: no display is needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402
from plot_logs import save_figure  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / 'overview.png'
SEED = 0

# Canvas in data units; the figure has the same aspect so squares stay square.
WIDTH, HEIGHT = 160.0, 100.0
FIGURE_SIZE = (16.0, 10.0)
DPI = 150

NUM_BLOCKS = 12
PAIRS = (0, 1, 2, 3, 8, 9, 10, 11)  # the papers' --s-id / --t-id for 12-block models
BLOCK_W, BLOCK_H, BLOCK_STEP = 5.6, 8.0, 7.6
BLOCKS_X0 = 24.0
TEACHER_Y, STUDENT_Y = 80.0, 50.0
GRID = 4  # the illustration's patch grid: N - 1 = GRID * GRID patches
TOKENS = GRID * GRID + 1
BATCH = 6
RANDOM_TOKENS = 10
ALD_LOSSES = (0.6, 0.5, 0.5, 0.7, 0.9, 1.0, 1.3, 1.6)  # illustrative per-pair losses L_k
LAST_W = 4.0
ALD_BAR_SCALE = 4.0  # canvas units per unit of ALD weight

TEACHER_COLOUR = '#f4a261'
TEACHER_PAIRED = '#e76f51'
STUDENT_COLOUR = '#9ecae1'
STUDENT_PAIRED = '#3182bd'
TERM_COLOUR = '#2a9d8f'
ALD_COLOUR = '#8e44ad'
GREY = '#d9d9d9'
PANEL_COLOUR = '#f7f7f7'
TEXT = dict(ha='center', va='center', fontsize=10)
SMALL = dict(ha='center', va='center', fontsize=8.5)


def box(ax, x: float, y: float, w: float, h: float, colour: str, text: str = '', **text_kwargs) -> None:
    """A rounded box with centred text."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle='round,pad=0.25,rounding_size=0.8', fc=colour,
                                ec='#333333', lw=0.8))
    if text:
        ax.text(x + w / 2, y + h / 2, text, **{**TEXT, **text_kwargs})


def arrow(ax, start: tuple, end: tuple, colour: str = '#333333', style: str = '-|>', lw: float = 1.2) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, lw=lw))


def matrix(ax, x: float, y: float, size: float, values: np.ndarray, cmap: str, label: str = '') -> None:
    """``values`` drawn as a heat map in the square ``(x, y, size)`` of the canvas, ``label`` under it."""
    inset = ax.inset_axes((x, y, size, size), transform=ax.transData)
    inset.imshow(values, cmap=cmap, interpolation='nearest')
    inset.set_xticks([])
    inset.set_yticks([])
    if label:
        ax.text(x + size / 2, y - 1.6, label, **SMALL)


def relations(rng: np.random.Generator, rows: int, dim: int = 8, noise: float = 0.0) -> np.ndarray:
    """A Gram matrix of normalised random features, optionally perturbed (the student's imperfect copy)."""
    features = rng.normal(size=(rows, dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features @ features.T + noise * rng.normal(size=(rows, rows))


def draw_model(ax, y: float, name: str, colour: str, paired: str, prefix: str) -> None:
    """Image -> patch embedding -> blocks -> head -> logits, on one row."""
    box(ax, 13.0, y, 7.0, BLOCK_H, GREY, 'patch\nembed', fontsize=8.5)
    arrow(ax, (20.4, y + BLOCK_H / 2), (BLOCKS_X0 - 0.4, y + BLOCK_H / 2))
    for i in range(NUM_BLOCKS):
        x = BLOCKS_X0 + i * BLOCK_STEP
        box(ax, x, y, BLOCK_W, BLOCK_H, paired if i in PAIRS else colour, f'{prefix}{i}',
            color='white' if i in PAIRS else 'black', fontweight='bold')
        if i < NUM_BLOCKS - 1:
            arrow(ax, (x + BLOCK_W + 0.3, y + BLOCK_H / 2), (x + BLOCK_STEP - 0.3, y + BLOCK_H / 2), style='-')
    head_x = BLOCKS_X0 + NUM_BLOCKS * BLOCK_STEP + 1.0
    arrow(ax, (head_x - 2.0, y + BLOCK_H / 2), (head_x - 0.3, y + BLOCK_H / 2))
    box(ax, head_x, y, 6.0, BLOCK_H, GREY, 'head', fontsize=8.5)
    arrow(ax, (head_x + 6.4, y + BLOCK_H / 2), (head_x + 8.6, y + BLOCK_H / 2))
    box(ax, head_x + 9.0, y, 7.0, BLOCK_H, colour, f'logits\n$z_{prefix.lower()}$', fontsize=9)
    ax.text(BLOCKS_X0, y + BLOCK_H + 2.2, name, ha='left', va='center', fontsize=11, fontweight='bold')


def draw_pairs(ax) -> None:
    """Dashed links between paired blocks, each with its ALD weight as a bar."""
    top, bottom = TEACHER_Y - 0.4, STUDENT_Y + BLOCK_H + 0.4
    middle = (top + bottom) / 2
    losses = np.array(ALD_LOSSES)
    weights = len(losses) * losses / losses.sum()
    for k, i in enumerate(PAIRS):
        x = BLOCKS_X0 + i * BLOCK_STEP + BLOCK_W / 2
        ax.plot([x, x], [bottom, top], ls=(0, (3, 2)), color='#555555', lw=1.0, zorder=0)
        is_last = k == len(PAIRS) - 1
        ax.add_patch(Rectangle((x - 1.2, middle - 4.5), 2.4, ALD_BAR_SCALE * weights[k], fc=ALD_COLOUR,
                               alpha=0.85, ec='none', hatch='///' if is_last else None))
    last_x = BLOCKS_X0 + PAIRS[-1] * BLOCK_STEP + BLOCK_W / 2
    ax.text(last_x + 2.2, middle - 1.0, f'$w_k$, last pair\nalso x --last-w\n({LAST_W:g})', ha='left',
            va='center', fontsize=8.5, color=ALD_COLOUR)
    gap_x = BLOCKS_X0 + 5.5 * BLOCK_STEP + BLOCK_W / 2
    ax.text(gap_x, middle + 4.4, 'paired blocks: --t-id 0 1 2 3 8 9 10 11 (teacher)\n'
            '--s-id 0 1 2 3 8 9 10 11 (student)', ha='center', va='center', fontsize=8.5)
    ax.text(gap_x, middle - 3.4, 'ALD (adaptive layer weighting) of the cls and atn terms:\n'
            r'$w_k = n\,L_k / \sum_j L_j$ (bars),  term $= \frac{1}{n}\sum_k w_k L_k$',
            ha='center', va='center', fontsize=8.5, color=ALD_COLOUR)


def draw_logit_terms(ax) -> None:
    head_x = BLOCKS_X0 + NUM_BLOCKS * BLOCK_STEP + 1.0
    x = head_x + 12.5
    arrow(ax, (x, TEACHER_Y - 0.5), (x, STUDENT_Y + BLOCK_H + 0.5), colour=TERM_COLOUR, lw=2)
    ax.text(x + 1.5, (TEACHER_Y + STUDENT_Y + BLOCK_H) / 2,
            'kd  (DeiT logit KD)\n--distillation-type soft:\n'
            r'$\alpha\,\tau^2\,\mathrm{KL}(\sigma(z_t/\tau)\,\|\,\sigma(z_s/\tau))$' '\n'
            r'--distillation-alpha $\alpha$' '\n' r'--distillation-tau $\tau$',
            ha='left', va='center', fontsize=8.5, color=TERM_COLOUR)
    ax.text(x, STUDENT_Y - 3.5, r'base: $(1-\alpha)\,\mathrm{CE}(z_s, y)$', ha='center', va='center', fontsize=8.5)


def draw_inputs(ax, rng: np.random.Generator) -> None:
    matrix(ax, 2.0, 61.0, 8.0, rng.uniform(size=(GRID, GRID, 3)), 'viridis')
    ax.text(6.0, 72.0, 'images\n(a batch of B)', **SMALL)
    arrow(ax, (10.5, 67.0), (12.8, TEACHER_Y + BLOCK_H / 2))
    arrow(ax, (10.5, 63.0), (12.8, STUDENT_Y + BLOCK_H / 2))
    ax.text(2.0, TEACHER_Y + BLOCK_H / 2, 'frozen', ha='left', va='center', fontsize=9, style='italic')


def panel(ax, x: float, w: float, title: str) -> None:
    ax.add_patch(FancyBboxPatch((x, 3.0), w, 34.0, boxstyle='round,pad=0.3,rounding_size=1.5', fc=PANEL_COLOUR,
                                ec='#999999', lw=0.8))
    ax.text(x + w / 2, 34.5, title, ha='center', va='center', fontsize=10.5, fontweight='bold', color=TERM_COLOUR)


def draw_cls_term(ax) -> None:
    panel(ax, 2.0, 44.0, '[CLS] tokens -> teacher width  (cls, --w-cls)')
    ax.text(24.0, 30.0, 'per pair k: the [CLS] token (token 0) of $s_k$ and $t_k$', **SMALL)
    box(ax, 4.0, 19.0, 10.0, 5.0, STUDENT_PAIRED, r'$S_{cls}$' '\n' r'width $D_s$', color='white', fontsize=9)
    arrow(ax, (14.4, 21.5), (17.6, 21.5))
    box(ax, 18.0, 17.0, 13.0, 9.0, GREY, 'projector\nfc-GELU-fc\n' r'$D_s \to D_t$', fontsize=8.5)
    ax.text(24.5, 14.0, '(only when $D_s \\neq D_t$;\ntrained with the student)', **SMALL)
    arrow(ax, (31.4, 21.5), (34.6, 21.5))
    box(ax, 35.0, 19.0, 9.0, 5.0, STUDENT_PAIRED, r'$D_t$', color='white', fontsize=9)
    box(ax, 35.0, 6.0, 9.0, 5.0, TEACHER_PAIRED, r'$T_{cls}$' '\n' r'$D_t$', color='white', fontsize=9)
    ax.annotate('', xy=(39.5, 18.6), xytext=(39.5, 11.4),
                arrowprops=dict(arrowstyle='<->', color=TERM_COLOUR, lw=1.5))
    ax.text(22.0, 7.5, r'MSE(proj(norm $S_{cls}$), norm $T_{cls}$)' '\nweighted over the pairs by ALD',
            ha='center', va='center', fontsize=8.5, color=TERM_COLOUR)


def draw_attention_term(ax, rng: np.random.Generator) -> None:
    panel(ax, 49.0, 30.0, 'CLS-patch attention  (atn, --w-atn)')
    ax.text(64.0, 30.0, r'$a = \mathrm{norm}(x_{cls})\,\mathrm{norm}(x_{patch})^\top$' '\n'
            r'one map of $N-1$ patches per image', **SMALL)
    teacher = rng.uniform(size=(GRID, GRID))
    teacher[1:3, 1:3] += 1.5  # the object: high [CLS] attention
    student = teacher + 0.6 * rng.normal(size=(GRID, GRID))
    matrix(ax, 52.0, 12.0, 10.0, teacher, 'magma', 'teacher $a_t$')
    matrix(ax, 66.0, 12.0, 10.0, student, 'magma', 'student $a_s$')
    ax.annotate('', xy=(65.6, 17.0), xytext=(62.4, 17.0),
                arrowprops=dict(arrowstyle='<->', color=TERM_COLOUR, lw=1.5))
    ax.text(64.0, 6.0, r'MSE($a_t$, $a_s$), ALD over the pairs', ha='center', va='center', fontsize=8.5,
            color=TERM_COLOUR)


def draw_manifold_terms(ax, rng: np.random.Generator) -> None:
    panel(ax, 82.0, 76.0, r'Manifold relations  ($\beta$ = --distillation-beta, mean over the pairs)')
    ax.text(120.0, 30.0, r'$F = \mathrm{norm}(X)$ per token; compare Gram matrices $F F^\top$: '
            r'they are the same size for any widths $D_s$, $D_t$', **SMALL)
    cases = (
        ('patch  (--w-patch)', r'$N \times N$ per image', TOKENS),
        ('sample  (--w-sample)', r'$B \times B$ per token', BATCH),
        ('random  (--w-rand)', r'$K \times K$, $K$ random tokens (--K)', RANDOM_TOKENS),
    )
    for i, (name, shape, rows) in enumerate(cases):
        x = 85.0 + i * 25.0
        teacher = relations(rng, rows)
        student = teacher + 0.35 * rng.normal(size=teacher.shape)
        ax.text(x + 10.5, 25.5, name, ha='center', va='center', fontsize=9.5, fontweight='bold')
        matrix(ax, x, 12.0, 9.0, teacher, 'RdBu_r', r'$F_t F_t^\top$')
        matrix(ax, x + 12.0, 12.0, 9.0, student, 'RdBu_r', r'$F_s F_s^\top$')
        ax.annotate('', xy=(x + 11.7, 16.5), xytext=(x + 9.3, 16.5),
                    arrowprops=dict(arrowstyle='<->', color=TERM_COLOUR, lw=1.5))
        ax.text(x + 10.5, 6.0, f'MSE, {shape}', ha='center', va='center', fontsize=8.5, color=TERM_COLOUR)


def draw_total(ax) -> None:
    ax.text(WIDTH / 2, 43.0,
            r'loss = base + kd + $\beta$(w_sample $L_{sample}$ + w_patch $L_{patch}$ + w_rand $L_{rand}$)'
            r' + w_cls ALD($L_{cls}$) + w_atn ALD($L_{atn}$)        '
            '(the keys of the train_* columns in log.txt)',
            ha='center', va='center', fontsize=10.5,
            bbox=dict(boxstyle='round,pad=0.4', fc='white', ec=TERM_COLOUR))


def draw_overview(out: Path) -> Path:
    """Draw the whole figure into ``out``; returns it."""
    rng = np.random.default_rng(SEED)
    fig = plt.figure(figsize=FIGURE_SIZE)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, HEIGHT)
    ax.set_aspect('equal')
    ax.axis('off')
    ax.text(WIDTH / 2, 97.0, 'What is distilled where: DeiT logit KD, Manifold Distillation and [CLS]-KD',
            ha='center', va='center', fontsize=15, fontweight='bold')
    draw_inputs(ax, rng)
    draw_model(ax, TEACHER_Y, r'Teacher (e.g. DeiT-B, CaiT-S24), token width $D_t$', TEACHER_COLOUR,
               TEACHER_PAIRED, 'T')
    draw_model(ax, STUDENT_Y, r'Student (e.g. DeiT-Ti), token width $D_s$', STUDENT_COLOUR, STUDENT_PAIRED, 'S')
    draw_pairs(ax)
    draw_logit_terms(ax)
    draw_total(ax)
    draw_cls_term(ax)
    draw_attention_term(ax, rng)
    draw_manifold_terms(ax, rng)
    return save_figure(fig, out, DPI)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=str(DEFAULT_OUT), help='PNG file to write (default: figs/overview.png)')
    args = parser.parse_args(argv)
    print(draw_overview(Path(args.out)))


if __name__ == '__main__':
    main()
