"""Student and teacher models (timm), token capture with forward hooks, and the [CLS]-KD projector."""
import contextlib
from typing import Callable, Iterator, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm

import utils
from losses import feature_distillation
from utils import UserError

# Checkpoints of the original TNT-S (timm 0.5.4) have the layout that timm 1.x calls "legacy".
LEGACY_VARIANTS = {'tnt_s_patch16_224': 'tnt_s_legacy_patch16_224'}
# A key that only the non-legacy TNT layout has, in timm's naming and in the original TNT release's.
TNT_NEW_LAYOUT_KEYS = ('blocks.0.norm2_proj.weight', 'blocks.0.proj_norm2.weight')
# DeiT's ViT init (timm 0.5.4 and the [CLS]-KD code): truncated normal with this std for Linear weights and tokens.
VIT_INIT_STD = 0.02


def block_tokens(output) -> torch.Tensor:
    """The ``[B, N, D]`` tokens of a block's output: TNT blocks return ``(pixel_embed, patch_embed)``."""
    return output[1] if isinstance(output, (tuple, list)) else output


class TokenCapture:
    """Forward hooks on the blocks named by ``block_ids``; ``pop()`` returns their outputs in that order.

    Only the requested blocks are hooked. Capture can be paused (evaluation needs no tokens).
    """

    def __init__(self, blocks: Sequence[nn.Module], block_ids: Sequence[int]):
        self.block_ids = list(block_ids)
        self.enabled = True
        self._tokens: dict[int, torch.Tensor] = {}
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in sorted(set(self.block_ids))]

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

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def attach_token_capture(model: nn.Module, block_ids: Sequence[int], flag: str) -> TokenCapture:
    """Hook ``model.blocks[i]`` for every ``i`` in ``block_ids`` and keep the capture on ``model.token_capture``."""
    num_blocks = len(model.blocks)
    bad = [i for i in block_ids if not 0 <= i < num_blocks]
    if bad:
        raise UserError(f'{flag} {" ".join(map(str, bad))}: the model has blocks 0..{num_blocks - 1}')
    capture = TokenCapture(model.blocks, block_ids)
    model.token_capture = capture
    return capture


def captured_tokens(model: nn.Module) -> list[torch.Tensor]:
    """Tokens captured during the model's last forward ([] when it captures none)."""
    capture: Optional[TokenCapture] = getattr(model, 'token_capture', None)
    return capture.pop() if capture is not None else []


@contextlib.contextmanager
def no_token_capture(*models: Optional[nn.Module]) -> Iterator[None]:
    """Pause token capture of the given models (evaluation)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            capture = getattr(model, 'token_capture', None) if model is not None else None
            if capture is not None:
                stack.enter_context(capture.paused())
        yield


class Projector(nn.Module):
    """Maps a normalised student [CLS] to the teacher's width: fc1 -> GELU -> drop -> fc2 -> drop."""

    def __init__(self, student_dim: int, teacher_dim: int, drop: float = 0.0):
        super().__init__()
        hidden = (student_dim + teacher_dim) // 2
        self.fc1 = nn.Linear(student_dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, teacher_dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class FrozenCompiledTeacher(nn.Module):
    """``torch.compile`` of the frozen teacher with inductor's weight freezing: its weights become constants of the
    graph (on the CPU its linear layers then run on prepacked weights), and its element-wise work is fused.

    Dynamo reads the freezing switch from the global inductor config when it traces, so the switch is on only
    during this model's calls: the student's graphs (whose weights change) never see it.
    """

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.compiled = torch.compile(teacher)

    @property
    def token_capture(self) -> Optional[TokenCapture]:
        return getattr(self.compiled, 'token_capture', None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(x)


def needs_projector(args) -> bool:
    return feature_distillation(args) and args.w_cls > 0 and args.dim_match in ('projector', 'both')


def build_model(name: str, flag: str, **kwargs) -> nn.Module:
    """``timm.create_model`` without pretrained weights; an unknown name is the user's error."""
    if not timm.is_model(name):
        raise UserError(f'{flag} {name}: unknown model (see timm.list_models())')
    return timm.create_model(name, pretrained=False, **kwargs)


def token_width(model_name: str, args) -> int:
    """The token width of a model, read from a weightless (meta device) instance."""
    with torch.device('meta'):
        model = build_model(model_name, '--teacher-model', num_classes=args.nb_classes, img_size=args.input_size)
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
    if isinstance(getattr(student, 'projector', None), nn.Module):
        student.projector.apply(init_weights_vit_timm)


def create_student(args, teacher: Optional[nn.Module] = None) -> nn.Module:
    """The student: a timm model (``--model``), hooks on ``--s-id`` blocks, the projector when ``--w-cls > 0``."""
    model = build_model(
        args.model, '--model',
        num_classes=args.nb_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        img_size=args.input_size,
    )
    if args.distillation_type != 'none' and hasattr(model, 'set_distilled_training'):
        model.set_distilled_training(True)
    if feature_distillation(args):
        attach_token_capture(model, args.s_id, '--s-id')
    if needs_projector(args):
        teacher_dim = teacher.embed_dim if teacher is not None else token_width(args.teacher_model, args)
        # With equal widths the original matched the normalised [CLS] directly, without a projector.
        if model.embed_dim != teacher_dim:
            model.projector = Projector(model.embed_dim, teacher_dim, drop=args.drop)
    init_like_originals(model)
    return model


def checkpoint_weights(checkpoint: dict) -> dict:
    """The weights inside a checkpoint or teacher file: DeiT/CaiT ``{'model': ...}``, ``{'state_dict': ...}`` or bare."""
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return utils.strip_prefix(checkpoint)


def load_weights(model: nn.Module, state_dict: dict, path: str, flag: str, model_flag: str) -> None:
    """Strict load; a file of another architecture is the user's error, named in one line."""
    model_state = model.state_dict()
    missing, unexpected = sorted(model_state.keys() - state_dict.keys()), sorted(state_dict.keys() - model_state.keys())
    mismatched = sorted(k for k in model_state.keys() & state_dict.keys()
                        if tuple(state_dict[k].shape) != tuple(model_state[k].shape))
    if missing or unexpected or mismatched:
        details = [f'{label} {len(keys)} keys (e.g. {keys[0]})'
                   for label, keys in (('missing', missing), ('unexpected', unexpected),
                                       ('shape-mismatched', mismatched)) if keys]
        raise UserError(f'{flag} {path} does not fit {model_flag}: ' + ', '.join(details))
    model.load_state_dict(state_dict)


def create_teacher(args) -> nn.Module:
    """The frozen teacher (``--teacher-model``) with weights from ``--teacher-path``, in eval mode,
    capturing the ``--t-id`` blocks. Teachers classify from [CLS] (no ``global_pool='avg'``)."""
    if not args.teacher_path:
        raise UserError('--teacher-path is required when --distillation-type is not none')
    return build_teacher(args, checkpoint_weights(utils.load_checkpoint(args.teacher_path)))


def build_teacher(args, state_dict: Optional[dict] = None) -> nn.Module:
    """A frozen, token-capturing teacher; with ``state_dict=None`` its weights stay random (benchmarks)."""
    name = args.teacher_model
    if (state_dict is not None and name in LEGACY_VARIANTS
            and not any(key in state_dict for key in TNT_NEW_LAYOUT_KEYS)):
        name = LEGACY_VARIANTS[name]
    model = build_model(name, '--teacher-model', num_classes=args.nb_classes, img_size=args.input_size)
    if state_dict is not None:
        if name.startswith('tnt_'):
            state_dict = timm.models.tnt.checkpoint_filter_fn(state_dict, model)
        load_weights(model, state_dict, args.teacher_path, '--teacher-path', f'--teacher-model {args.teacher_model}')
    model.eval().requires_grad_(False)
    if feature_distillation(args):
        attach_token_capture(model, args.t_id, '--t-id')
    return model


def check_token_shapes(args, student: nn.Module, teacher: nn.Module, device: torch.device) -> None:
    """One blank image through both models: the captured token counts must fit the active feature terms.

    Manifold slices ``e = N_s - N_t`` leading student tokens (``e >= 0``); the attention and norm terms compare
    token maps position by position, so they need ``N_s == N_t``.
    """
    if not feature_distillation(args):
        return
    image = torch.zeros(1, 3, args.input_size, args.input_size, device=device)
    with torch.inference_mode():
        teacher(image)
        student(image)
    tokens_t, tokens_s = captured_tokens(teacher)[0].shape[1], captured_tokens(student)[0].shape[1]
    models = f'--model {args.model} has {tokens_s} tokens per block, --teacher-model {args.teacher_model} {tokens_t}'
    if args.manifold and tokens_s < tokens_t:
        raise UserError(f'{models}: the Manifold terms need at least as many student tokens (--no-manifold)')
    if args.w_atn > 0 and tokens_s != tokens_t:
        raise UserError(f'{models}: --w-atn needs equal token counts')
    if args.norm_distill and tokens_s != tokens_t:
        raise UserError(f'{models}: --norm-distill needs equal token counts')
