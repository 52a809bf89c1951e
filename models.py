"""Student and teacher models (timm), token capture with forward hooks, and the [CLS]-KD projector."""
import contextlib
from typing import Callable, Iterator, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm

import checkpoints
from losses import feature_distillation
from utils import UserError

# DeiT's ViT init (timm 0.5.4 and the [CLS]-KD code): truncated normal with this std for Linear weights and tokens.
VIT_INIT_STD = 0.02


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
        missing = [i for i in self.block_ids if i not in self._tokens]
        if missing:
            raise RuntimeError(f'no tokens were captured for blocks {missing}: run the model forward first')
        tokens = [self._tokens[i] for i in self.block_ids]
        self._tokens.clear()
        return tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled


def check_block_ids(model: nn.Module, block_ids: Sequence[int], flag: str) -> None:
    num_blocks = len(model.blocks)
    bad = [i for i in block_ids if not 0 <= i < num_blocks]
    if bad:
        raise UserError(f'{flag} {" ".join(map(str, bad))}: the model has blocks 0..{num_blocks - 1}')


def attach_token_capture(model: nn.Module, block_ids: Sequence[int], flag: str) -> None:
    """Hook ``model.blocks[i]`` for every ``i`` in ``block_ids``; the capture is ``model.token_capture``."""
    check_block_ids(model, block_ids, flag)
    model.token_capture = TokenCapture(model.blocks, block_ids)


@contextlib.contextmanager
def no_token_capture(*models: nn.Module) -> Iterator[None]:
    """Pause the token capture of the given models (evaluation)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(model.token_capture.paused())
        yield


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


def build_model(name: str, flag: str, **kwargs) -> nn.Module:
    """``timm.create_model`` without pretrained weights; an unknown name is the user's error."""
    if not timm.is_model(name):
        raise UserError(f'{flag} {name}: unknown model (see timm.list_models())')
    return timm.create_model(name, pretrained=False, **kwargs)


def token_width(model_name: str, num_classes: int, input_size: int) -> int:
    """The token width of a model, read from a weightless (meta device) instance."""
    with torch.device('meta'):
        model = build_model(model_name, '--teacher-model', num_classes=num_classes, img_size=input_size)
    return model.embed_dim


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


def create_teacher(args, num_classes: Optional[int] = None) -> nn.Module:
    """The frozen teacher (``--teacher-model``) with weights from ``--teacher-path``, in eval mode, capturing the
    ``--t-id`` blocks. Teachers classify from [CLS] (no ``global_pool='avg'``). ``num_classes`` defaults to
    ``args.nb_classes``."""
    if not args.teacher_path:
        raise UserError('--teacher-path is required when --distillation-type is not none')
    state_dict = checkpoints.checkpoint_weights(checkpoints.load_checkpoint(args.teacher_path))
    name = checkpoints.teacher_architecture(args.teacher_model, state_dict)
    model = build_model(name, '--teacher-model', num_classes=args.nb_classes if num_classes is None else num_classes,
                        img_size=args.input_size)
    checkpoints.load_teacher_weights(model, state_dict, args.teacher_path, f'--teacher-model {args.teacher_model}')
    return freeze_teacher(model, args)


def random_teacher(args, num_classes: int) -> nn.Module:
    """A teacher of the ``--teacher-model`` architecture with random weights (speed does not depend on them)."""
    return freeze_teacher(build_model(args.teacher_model, '--teacher-model', num_classes=num_classes,
                                      img_size=args.input_size), args)


def freeze_teacher(model: nn.Module, args) -> nn.Module:
    model.eval().requires_grad_(False)
    attach_token_capture(model, args.t_id if feature_distillation(args) else [], '--t-id')
    return model


def check_token_shapes(args, num_classes: int) -> None:
    """Build both models on the meta device (no weights, no memory) and pass one image through them: the blocks
    must exist and the captured token counts fit the active feature terms.

    Manifold slices ``e = N_s - N_t`` leading student tokens (``e >= 0``); the attention and norm terms compare
    token maps position by position, so they need ``N_s == N_t``.
    """
    if not feature_distillation(args):
        return
    with torch.device('meta'):
        teacher = random_teacher(args, num_classes)
        student = create_student(args, teacher, num_classes)
        image = torch.empty(1, 3, args.input_size, args.input_size)
        teacher(image)
        student(image)
    tokens_t, tokens_s = teacher.token_capture.pop()[0].shape[1], student.token_capture.pop()[0].shape[1]
    models = f'--model {args.model} has {tokens_s} tokens per block, --teacher-model {args.teacher_model} {tokens_t}'
    if args.manifold and tokens_s < tokens_t:
        raise UserError(f'{models}: the Manifold terms need at least as many student tokens (--no-manifold)')
    if args.w_atn > 0 and tokens_s != tokens_t:
        raise UserError(f'{models}: --w-atn needs equal token counts')
    if args.norm_distill and tokens_s != tokens_t:
        raise UserError(f'{models}: --norm-distill needs equal token counts')
