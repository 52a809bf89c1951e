"""Student and teacher models (timm), token capture with forward hooks, and the [CLS]-KD projector."""
import contextlib
import os
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.data import resolve_model_data_config
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, trunc_normal_
from timm.models import PretrainedCfg, get_pretrained_cfg, resolve_pretrained_cfg, split_model_name_tag
from huggingface_hub import try_to_load_from_cache
from timm.models._builder import _resolve_pretrained_source
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm

import checkpoints
from losses import feature_distillation
from utils import UserError

# DeiT's ViT init (timm 0.5.4 and the [CLS]-KD code): truncated normal with this std for Linear weights and tokens.
VIT_INIT_STD = 0.02
# --teacher-path values that take timm's own pretrained weights of --teacher-model instead of a file or URL: those of
# its pretrained tag (from the Hugging Face hub or the tag's URL), or those of a hub repository (timm's spelling).
TIMM_WEIGHTS = 'timm'
HF_HUB_PREFIX = 'hf-hub:'
# Where the ViT family keeps its patch embedding (patch_size, grid_size): ViT, DeiT, CaiT, EVA, ...; TNT.
PATCH_EMBEDDINGS = ('patch_embed', 'pixel_embed')
# The files timm reads from a hub repository without a filename override, in its order.
HF_WEIGHT_FILES = (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)


def block_tokens(output) -> torch.Tensor:
    """The ``[B, N, D]`` tokens of a block's output: TNT blocks return ``(pixel_embed, patch_embed)``."""
    return output[1] if isinstance(output, (tuple, list)) else output


class TokenCapture:
    """Forward hooks on the blocks named by ``block_ids``; ``pop()`` returns their outputs in that order.

    Only the requested blocks are hooked (none: ``pop()`` returns ``[]``). Capture can be paused (evaluation needs
    no tokens).
    """

    def __init__(self, blocks: Sequence[nn.Module], block_ids: Sequence[int]):
        self.block_ids = list(block_ids)
        self.enabled = True
        self._tokens: dict[int, torch.Tensor] = {}
        for i in sorted(set(self.block_ids)):
            blocks[i].register_forward_hook(self._hook(i))

    def _hook(self, block_id: int) -> Callable:
        def hook(module: nn.Module, args, output) -> None:
            if self.enabled:
                self._tokens[block_id] = block_tokens(output)
        return hook

    def pop(self) -> list[torch.Tensor]:
        """The captured tokens of the last forward, one ``[B, N, D]`` tensor per requested block id."""
        tokens = self.pop_by_block()
        return [tokens[i] for i in self.block_ids]

    def pop_by_block(self) -> dict[int, torch.Tensor]:
        """The captured tokens of the last forward by block id (a teacher shared by students that pair different
        blocks: each takes its own)."""
        missing = sorted(set(self.block_ids) - self._tokens.keys())
        if missing:
            raise RuntimeError(f'no tokens were captured for blocks {missing}: run the model forward first')
        tokens, self._tokens = self._tokens, {}
        return tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled


def check_block_ids(model: nn.Module, block_ids: Sequence[int], flag: str) -> None:
    if block_ids and not hasattr(model, 'blocks'):
        raise UserError(f'{flag}: {type(model).__name__} has no transformer blocks to distil tokens from '
                        '(drop --s-id/--t-id for logit-only KD)')
    num_blocks = len(model.blocks) if block_ids else 0
    bad = [i for i in block_ids if not 0 <= i < num_blocks]
    if bad:
        raise UserError(f'{flag} {" ".join(map(str, bad))}: the model has blocks 0..{num_blocks - 1}')


def attach_token_capture(model: nn.Module, block_ids: Sequence[int], flag: str) -> None:
    """Hook ``model.blocks[i]`` for every ``i`` in ``block_ids``; the capture is ``model.token_capture``."""
    check_block_ids(model, block_ids, flag)
    model.token_capture = TokenCapture(model.blocks if block_ids else [], block_ids)


@contextlib.contextmanager
def no_token_capture(*models: nn.Module) -> Iterator[None]:
    """Pause the token capture of the given models (evaluation)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(model.token_capture.paused())
        yield


def renormalisation(student_mean: Sequence[float], student_std: Sequence[float], teacher_mean: Sequence[float],
                    teacher_std: Sequence[float]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)``, each ``[1, C, 1, 1]``, of the per-channel map ``x_t = x_s * scale + shift`` from the
    student's normalisation to the teacher's: ``scale = std_s / std_t``, ``shift = (mean_s - mean_t) / std_t``.

    None when both use the same statistics: then there is nothing to compute and the images pass unchanged.
    """
    if tuple(student_mean) == tuple(teacher_mean) and tuple(student_std) == tuple(teacher_std):
        return None
    mean_s, std_s, mean_t, std_t = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)
                                    for v in (student_mean, student_std, teacher_mean, teacher_std))
    return (std_s / std_t).float(), ((mean_s - mean_t) / std_t).float()


class Teacher(nn.Module):
    """The frozen timm teacher (``model``) fed the student's batch, after mixup: one per-channel affine map on the
    device takes the images from the student's normalisation to the teacher's own (its ``pretrained_cfg`` mean
    and std), so there is no second data pipeline. Mixup's convex combinations commute with the map.

    Teachers trained with the student's statistics (DeiT, CaiT: ImageNet's) get no map at all: their input is the
    student's tensor itself. The map's buffers are not persistent: no checkpoint holds them.
    """

    def __init__(self, model: nn.Module, student_mean: Sequence[float], student_std: Sequence[float]):
        super().__init__()
        self.model = model
        self.token_capture = model.token_capture
        config = resolve_model_data_config(model)
        affine = renormalisation(student_mean, student_std, config['mean'], config['std'])
        self.renormalises = affine is not None
        if self.renormalises:
            self.register_buffer('scale', affine[0], persistent=False)
            self.register_buffer('shift', affine[1], persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def to_teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """Student-normalised images in the teacher's normalisation (``x`` itself where they agree)."""
        return torch.addcmul(self.shift, x, self.scale) if self.renormalises else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.to_teacher_input(x))


class FrozenCompiledTeacher(nn.Module):
    """``torch.compile`` of the frozen teacher with inductor's weight freezing: its weights become constants of the
    graph (on the CPU its linear layers then run on prepacked weights), and its element-wise work is fused.

    Dynamo reads the freezing switch from the global inductor config when it traces, so the switch is on only
    during this model's calls: the student's graphs (whose weights change) never see it.
    """

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.token_capture = teacher.token_capture
        self.compiled = torch.compile(teacher)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(x)


def store_matmul_weights_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Keep a frozen model's Linear and Conv2d parameters in the autocast ``dtype``.

    Autocast casts them to ``dtype`` on every call anyway, and caches the casts only of weights that require
    grad, so a frozen teacher's weights were read and rewritten every step; stored cast, the results are
    bit-identical and that traffic is gone. Norm layers and tokens stay float32, as autocast keeps them.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(dtype)
    return model


def needs_projector(args) -> bool:
    return feature_distillation(args) and args.w_cls > 0 and args.dim_match in ('projector', 'both')


def check_model_name(name: str, flag: str) -> None:
    """An unknown model name or pretrained tag is the user's error."""
    if not timm.is_model(name):
        raise UserError(f'{flag} {name}: unknown model (see timm.list_models())')
    try:
        get_pretrained_cfg(name)
    except RuntimeError as err:
        raise UserError(f'{flag} {name}: {err} (see timm.list_pretrained())') from None


def build_model(name: str, flag: str, **kwargs) -> nn.Module:
    """``timm.create_model`` without pretrained weights; an unknown name is the user's error."""
    check_model_name(name, flag)
    return timm.create_model(name, pretrained=False, **kwargs)


def teacher_size_kwargs(name: str, image_size: Union[int, tuple[int, int]]) -> dict:
    """``img_size`` for a teacher whose position embedding fixes its input size (timm's ``fixed_input_size``: the
    ViT family); other classifiers (CNNs) take any image size and have no such argument."""
    check_model_name(name, '--teacher-model')
    cfg = get_pretrained_cfg(name)
    return {'img_size': image_size} if cfg is None or cfg.fixed_input_size else {}


def token_width(model_name: str, num_classes: int, input_size: int) -> Optional[int]:
    """The token width of a model, read from a weightless (meta device) instance; None for a model without tokens
    (a CNN)."""
    with torch.device('meta'):
        model = build_model(model_name, '--teacher-model', num_classes=num_classes,
                            **teacher_size_kwargs(model_name, input_size))
    return getattr(model, 'embed_dim', None)


def init_like_originals(student: nn.Module) -> None:
    """Give a fresh student the originals' start where timm 1.x differs from it.

    timm 1.x draws [CLS] from N(0, 1e-6); the originals (timm 0.5.4's ViT and the [CLS]-KD copy of it) draw it
    from a truncated normal with std 0.02, like the distillation token and the position embedding, which timm 1.x
    still draws so. The projector gets the ViT init of every other Linear (truncated normal 0.02, zero bias) instead
    of PyTorch's default. Everything else (Linear layers, LayerNorm, the patch-embedding convolution left at
    PyTorch's default) already starts as in the originals.
    """
    if isinstance(student, VisionTransformer) and student.cls_token is not None:
        trunc_normal_(student.cls_token, std=VIT_INIT_STD)
    student.projector.apply(init_weights_vit_timm)


def create_student(args, teacher: Optional[nn.Module] = None, num_classes: Optional[int] = None) -> nn.Module:
    """The student: a timm model (``--model``), hooks on the ``--s-id`` blocks, and ``projector``.

    The projector maps a normalised student [CLS] to the teacher's width (timm's ``Mlp``: fc1, GELU, fc2, dropout
    ``--drop``), as in the [CLS]-KD releases, whose checkpoints hold ``projector.fc1/fc2`` beside the ViT keys. It
    is ``nn.Identity`` (no weights) when the [CLS] term needs none: equal widths, where the original matched the
    normalised [CLS] directly, the relation mode, or no [CLS] term. ``num_classes`` defaults to
    ``args.nb_classes``.
    """
    num_classes = args.nb_classes if num_classes is None else num_classes
    model = build_model(args.model, '--model', num_classes=num_classes, drop_rate=args.drop,
                        drop_path_rate=args.drop_path, img_size=args.input_size)
    if args.distillation_type != 'none' and hasattr(model, 'set_distilled_training'):
        model.set_distilled_training(True)
    attach_token_capture(model, args.s_id if feature_distillation(args) else [], '--s-id')
    model.projector = nn.Identity()
    if needs_projector(args):
        teacher_dim = (teacher.embed_dim if teacher is not None
                       else token_width(args.teacher_model, num_classes, args.input_size))
        if model.embed_dim != teacher_dim:
            model.projector = Mlp(model.embed_dim, (model.embed_dim + teacher_dim) // 2, teacher_dim,
                                  act_layer=nn.GELU, drop=args.drop)
    init_like_originals(model)
    return model


def timm_weights_overlay(teacher_path: str) -> Optional[dict]:
    """timm's ``pretrained_cfg_overlay`` for ``--teacher-path timm`` (nothing to change: the pretrained tag's own
    source) or ``hf-hub:<repo>`` (that repository instead); None for a file or URL, which are read as checkpoints.

    An overlay with ``file=<path>`` (timm's spelling, as in its ``--pretrained-path``) loads a local copy of timm's
    weights through the same path, offline: that is how the tests load them.
    """
    if teacher_path == TIMM_WEIGHTS:
        return {}
    if teacher_path.startswith(HF_HUB_PREFIX):
        return dict(source='hf-hub', hf_hub_id=teacher_path.removeprefix(HF_HUB_PREFIX), hf_hub_filename=None)
    return None


def timm_weights_cfg(model_name: str, teacher_path: str) -> Optional[PretrainedCfg]:
    """The pretrained config of the timm weights ``--teacher-path`` names (the tag's, with the overlay applied), as
    timm resolves it; None when the weights come from a file or URL."""
    overlay = timm_weights_overlay(teacher_path)
    if overlay is None:
        return None
    check_model_name(model_name, '--teacher-model')
    architecture, tag = split_model_name_tag(model_name)
    return resolve_pretrained_cfg(architecture, pretrained_cfg=tag or None, pretrained_cfg_overlay=overlay)


def check_timm_weights(model_name: str, teacher_path: str) -> None:
    """``--teacher-path timm`` needs a pretrained tag that has weights (checked before anything is downloaded)."""
    if not timm_weights_cfg(model_name, teacher_path).has_weights:
        raise UserError(f'--teacher-path {teacher_path}: timm has no pretrained weights for --teacher-model '
                        f'{model_name} (timm.list_pretrained() lists the models and tags that have)')


def weights_input_size(model_name: str, teacher_path: str, input_size: int) -> tuple[int, int]:
    """The image size the teacher's weights were trained at: that of timm's weights for a teacher with a fixed
    input size, else ``--input-size`` (a file's position embedding is checked when it is loaded)."""
    cfg = timm_weights_cfg(model_name, teacher_path)
    if cfg is not None and cfg.fixed_input_size and cfg.input_size:
        return tuple(cfg.input_size[1:])
    return input_size, input_size


def pretrained_teacher(model_name: str, teacher_path: str, num_classes: int, input_size: int) -> nn.Module:
    """``--teacher-model`` with timm's pretrained weights: ``timm.create_model(pretrained=True)``, which downloads
    them (where there is a network) or reads the overlay's local file. Its classifier must fit the data set: timm
    would otherwise replace it with a random one."""
    cfg = timm_weights_cfg(model_name, teacher_path)
    if cfg.num_classes != num_classes:
        raise UserError(f'--teacher-path {teacher_path}: the weights of --teacher-model {model_name} classify '
                        f'{cfg.num_classes} classes, the data set has {num_classes}: pass a teacher trained on them')
    if cfg.fixed_input_size and tuple(cfg.input_size[1:]) != (input_size, input_size):
        print(f'Note: the weights of --teacher-model {model_name} are for {cfg.input_size[1]} px; timm resamples '
              f'its position embedding to --input-size {input_size}')
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=timm_weights_overlay(teacher_path),
                                 num_classes=num_classes, **teacher_size_kwargs(model_name, input_size))
    except Exception as err:  # noqa: BLE001 - told apart by type and by reading the weights file
        raise checkpoints.pretrained_weights_error(err, teacher_path, f'--teacher-model {model_name}',
                                                   timm_weights_file(cfg)) from None


def timm_weights_file(cfg: PretrainedCfg) -> Optional[str]:
    """Where timm keeps the weights of ``cfg`` on this machine: the overlay's file, the Hugging Face cache's copy or
    torch hub's download of the tag's URL; None when they are not here (yet)."""
    load_from, location = _resolve_pretrained_source(cfg.to_dict())
    if load_from in ('file', 'local-dir'):
        return location
    if load_from == 'hf-hub':
        repo, filenames = (location[0], [location[1]]) if isinstance(location, tuple) else (location, HF_WEIGHT_FILES)
        repo_id, revision = hf_split(repo)
        cached = (try_to_load_from_cache(repo_id, name, revision=revision) for name in filenames)
        return next((path for path in cached if isinstance(path, str)), None)
    if load_from == 'url':
        return os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urllib.parse.urlparse(location).path))
    return None


def create_teacher(args, num_classes: Optional[int] = None, block_ids: Optional[Sequence[int]] = None) -> Teacher:
    """The frozen teacher (``--teacher-model``) with weights from ``--teacher-path`` (a file, a URL, or timm's
    pretrained weights), in eval mode, capturing the ``--t-id`` blocks (or ``block_ids``: those of several
    students), fed the student's images in its own normalisation. Teachers classify from [CLS] (no
    ``global_pool='avg'``). ``num_classes`` defaults to ``args.nb_classes``."""
    if not args.teacher_path:
        raise UserError('--teacher-path is required when --distillation-type is not none')
    num_classes = args.nb_classes if num_classes is None else num_classes
    if timm_weights_overlay(args.teacher_path) is not None:
        model = pretrained_teacher(args.teacher_model, args.teacher_path, num_classes, args.input_size)
    else:
        state_dict = checkpoints.checkpoint_weights(checkpoints.load_checkpoint(args.teacher_path))
        name = checkpoints.teacher_architecture(args.teacher_model, state_dict)
        model = build_model(name, '--teacher-model', num_classes=num_classes,
                            **teacher_size_kwargs(name, args.input_size))
        checkpoints.load_teacher_weights(model, state_dict, args.teacher_path,
                                         f'--teacher-model {args.teacher_model}')
    return freeze_teacher(model, args, block_ids)


def random_teacher(args, num_classes: int, image_size: Optional[tuple[int, int]] = None,
                   block_ids: Optional[Sequence[int]] = None) -> Teacher:
    """A teacher of the ``--teacher-model`` architecture with random weights (speed does not depend on them), for
    images of ``image_size`` (default ``--input-size``)."""
    size = image_size or args.input_size
    return freeze_teacher(build_model(args.teacher_model, '--teacher-model', num_classes=num_classes,
                                      **teacher_size_kwargs(args.teacher_model, size)), args, block_ids)


def teacher_blocks(args) -> list[int]:
    """The teacher blocks a student's feature terms pair with (``--t-id``; none without feature distillation)."""
    return list(args.t_id) if feature_distillation(args) else []


def freeze_teacher(model: nn.Module, args, block_ids: Optional[Sequence[int]] = None) -> Teacher:
    """Eval mode, no gradients, hooks on the ``--t-id`` blocks (or ``block_ids``), and the map from the student's
    normalisation (ImageNet's, as ``datasets.py`` normalises) to the teacher's."""
    model.eval().requires_grad_(False)
    attach_token_capture(model, teacher_blocks(args) if block_ids is None else block_ids, '--t-id')
    return Teacher(model, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).eval()


@dataclass(frozen=True)
class TokenLayout:
    """The tokens of a distilled block: ``prefix`` tokens ([CLS], distillation or register tokens; none in CaiT's
    trunk) before a ``grid`` of ``patch_size`` patches of ``image_size`` images (sizes ``(height, width)`` in px)."""
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    prefix: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    def __str__(self) -> str:
        return (f'{self.prefix} prefix + {self.grid[0]}x{self.grid[1]} patches of {pixels(self.patch_size)} '
                f'at {pixels(self.image_size)}')


def pixels(size: tuple[int, int]) -> str:
    return f'{size[0]} px' if size[0] == size[1] else f'{size[0]}x{size[1]} px'


def token_layout(model: nn.Module, flag: str, image_size: tuple[int, int], tokens: int) -> TokenLayout:
    """Patch size and grid from the model's patch embedding (timm's ``patch_size``, ``grid_size``); the prefix
    tokens are what a captured block has beyond the patches."""
    embedding = next((getattr(model, name) for name in PATCH_EMBEDDINGS if hasattr(model, name)), None)
    if embedding is None:
        raise UserError(f'{flag}: {type(model).__name__} has no patch embedding, so its tokens cannot be paired '
                        '(drop --s-id/--t-id for logit-only KD)')
    grid = tuple(embedding.grid_size)
    return TokenLayout(tuple(image_size), tuple(embedding.patch_size), grid, tokens - grid[0] * grid[1])


def unpaired_terms(args, student: TokenLayout, teacher: TokenLayout) -> list[str]:
    """What each active feature term needs of the two layouts and does not get.

    Manifold slices ``e = N_s - N_t`` leading student tokens (the student's extra prefix tokens) and then relates
    tokens position by position, so the patches must coincide; the attention and norm terms compare token maps
    position by position, so everything must. The [CLS] terms take token 0 of each side and need neither.
    """
    same_patches = (student.image_size, student.patch_size, student.grid) == (
        teacher.image_size, teacher.patch_size, teacher.grid)
    same_tokens = same_patches and student.prefix == teacher.prefix
    needs = []
    if args.manifold and not (same_patches and student.prefix >= teacher.prefix):
        needs.append('the Manifold terms need the same patches and at least as many student prefix tokens '
                     '(--no-manifold)')
    if args.w_atn > 0 and not same_tokens:
        needs.append('--w-atn needs equal token counts (the same patches and prefix tokens)')
    if args.norm_distill and not same_tokens:
        needs.append('--norm-distill needs equal token counts (the same patches and prefix tokens)')
    return needs


def layout_differences(student: TokenLayout, teacher: TokenLayout) -> list[str]:
    return [name for name, a, b in (('resolution', student.image_size, teacher.image_size),
                                    ('patch size', student.patch_size, teacher.patch_size),
                                    ('grid', student.grid, teacher.grid),
                                    ('prefix tokens', student.prefix, teacher.prefix)) if a != b]


def check_token_shapes(args, num_classes: int) -> None:
    """Build both models on the meta device (no weights, no memory) and pass one image through each, the teacher's
    at the resolution of its weights: the blocks must exist and the token layouts fit the active feature terms
    (``unpaired_terms``); otherwise one line says what differs and what the terms need.
    """
    if not feature_distillation(args):
        return
    teacher_size = weights_input_size(args.teacher_model, args.teacher_path, args.input_size)
    student_size = (args.input_size, args.input_size)
    with torch.device('meta'):
        teacher = random_teacher(args, num_classes, teacher_size)
        student = create_student(args, teacher, num_classes)
        teacher(torch.empty(1, 3, *teacher_size))
        student(torch.empty(1, 3, *student_size))
    layout_t = token_layout(teacher.model, '--teacher-model', teacher_size, teacher.token_capture.pop()[0].shape[1])
    layout_s = token_layout(student, '--model', student_size, student.token_capture.pop()[0].shape[1])
    needs = unpaired_terms(args, layout_s, layout_t)
    if needs:
        raise UserError(f'--model {args.model} has {layout_s.tokens} tokens per block ({layout_s}), --teacher-model '
                        f'{args.teacher_model} {layout_t.tokens} ({layout_t}): '
                        f'{" and ".join(layout_differences(layout_s, layout_t))} differ; {"; ".join(needs)}')


def check_weight_files(args, num_classes: int) -> None:
    """The local files of ``--teacher-path`` (when the run trains with a teacher) and ``--resume``, checked against
    weightless (meta-device) models before anything is written: a file of another architecture (or class count) is
    one line naming it. The files are read lazily (memory-mapped): keys and shapes, next to no bytes."""
    def local(path: str) -> bool:
        return bool(path) and timm_weights_overlay(path) is None and not path.startswith(checkpoints.URL_SCHEMES)

    if not args.eval and args.distillation_type != 'none' and local(args.teacher_path):
        state_dict = checkpoints.checkpoint_weights(checkpoints.load_checkpoint(args.teacher_path, lazy=True))
        name = checkpoints.teacher_architecture(args.teacher_model, state_dict)
        with torch.device('meta'):
            teacher = build_model(name, '--teacher-model', num_classes=num_classes,
                                  **teacher_size_kwargs(name, args.input_size))
        checkpoints.check_fit(teacher, checkpoints.teacher_state_dict(teacher, state_dict), args.teacher_path,
                              '--teacher-path', f'--teacher-model {args.teacher_model}')
    if local(args.resume):
        checkpoint = checkpoints.load_checkpoint(args.resume, lazy=True)
        if isinstance(checkpoint.get('model'), dict):
            with torch.device('meta'):
                student = create_student(args, None, num_classes)
            state_dict, _ = checkpoints.student_state_dict(student, checkpoint['model'], not args.eval)
            checkpoints.check_fit(student, state_dict, args.resume, '--resume', checkpoints.student_flag(student))


def load_teacher(args, num_classes: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 students: Optional[Sequence] = None) -> Optional[Teacher]:
    """The frozen teacher on ``device`` for the students whose flags are ``students`` (default: ``args``'s alone;
    None when none distils), capturing the blocks any of them pairs with, its matmul weights stored in the
    autocast ``dtype``. Without ``--teacher-path`` (allowed for ``--benchmark`` only) its weights stay random:
    speed does not depend on them."""
    students = [args] if students is None else students
    if all(student.distillation_type == 'none' for student in students):
        return None
    blocks = sorted({block for student in students for block in teacher_blocks(student)})
    print(f'Creating teacher model: {args.teacher_model}')
    if args.teacher_path:
        teacher = create_teacher(args, num_classes, blocks)
    else:
        print('No --teacher-path: the teacher keeps random weights (for the benchmark)')
        teacher = random_teacher(args, num_classes, block_ids=blocks)
    teacher.to(device)
    if dtype != torch.float32:
        store_matmul_weights_in(teacher, dtype)
    return teacher


def compile_student(model: nn.Module, criterion: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``torch.compile`` the student (token hooks traced with it) and its criterion (the loss terms'
    normalisations and copies fused)."""
    return torch.compile(model), torch.compile(criterion)


def compile_teacher(teacher: Optional[nn.Module]) -> Optional[nn.Module]:
    """The teacher compiled with its weights frozen (``FrozenCompiledTeacher``); no teacher stays none."""
    return FrozenCompiledTeacher(teacher) if teacher is not None else None
