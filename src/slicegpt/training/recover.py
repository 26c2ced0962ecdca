"""Recovery training: distil the dense teacher into the compressed student, or fine-tune it.

One loop for every combination of loss (``kd``: KL from the teacher's next-token distribution,
computed batch by batch and never stored; ``lm``: next-token cross-entropy) and trained weights
(``all``, or LoRA adapters merged at the end). Training rows come from the training text's
calibration part, with ``val_rows`` of them held out for validation (early stopping and the kept
best state use that, never evaluation text). Everything that decides the result is seeded, and a
checkpoint restores all of it, so a resumed run ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch import spec_for_config
from ..config import RecoverConfig, check_device, parse_dtype
from ..core.distributed import TorchDistributedReduction
from ..core.surgery import get_layers
from ..data import Rows, bos_for, clip_seqlen, label
from ..sources import is_conversations, resolve_auto, training_rows
from . import lora
from .state import STATE_FILE, check_fingerprint, fingerprint, load_state, save_state


log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training went numerically wrong (a NaN or infinite loss or gradient)."""


@dataclass
class RecoveryReport:
    """What a recovery run did: settings, data, tokens, time, and its validation curve."""

    loss: str
    train: str
    data: str
    teacher: str | None
    steps: int
    tokens: int
    seconds: float
    trainable_parameters: int
    settings: dict[str, Any]
    curve: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    resumed_at_step: int | None = None
    data_sha256: str | None = None  # of the training rows' token ids
    planned_steps: int | None = None  # the steps a time budget planned (None: no budget, or never planned)
    stopped_on_time: bool = False  # the time budget ran out before the planned steps

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def kept_val_ppl(self) -> float | None:
        """The validation perplexity of the weights returned: the kept best state's, else the last."""
        if not self.curve:
            return None
        at = self.best_step if self.best_step is not None else self.curve[-1]["step"]
        return [p for p in self.curve if p["step"] == at][-1]["val_ppl"]

    @property
    def worse_than_start(self) -> bool:
        """Whether the weights returned validate worse than the model given (step 0's validation):
        a learning rate too high for the model, typically; the input itself is never changed."""
        kept = self.kept_val_ppl
        return kept is not None and self.curve[0]["step"] == 0 and kept > self.curve[0]["val_ppl"]

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "tokens_per_second": self.tokens_per_second,
            "kept_val_ppl": self.kept_val_ppl,
            "worse_than_start": self.worse_than_start,
        }

    def warning(self) -> str | None:
        """A line for a run that returns weights worse than it was given, else None."""
        if not self.worse_than_start:
            return None
        return (
            f"warning: the recovered weights validate worse than the model given "
            f"(perplexity {self.kept_val_ppl:.3f} against {self.curve[0]['val_ppl']:.3f} at step 0): "
            f"try a lower --lr (this run: {self.settings.get('lr')}); --time-budget or --early-stop-patience "
            "keep the best validated state, the start included"
        )


def check_teacher(student: nn.Module, tokenizer: Any, teacher: nn.Module, teacher_tokenizer: Any | None) -> None:
    """The teacher must predict over the student's vocabulary with the same tokenizer."""
    vs, vt = _vocab_size(student), _vocab_size(teacher)
    if vs != vt:
        raise ValueError(f"the teacher predicts {vt} tokens and the student {vs}: they must share a tokenizer")
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError("the teacher's tokenizer differs from the student's: distillation needs one tokenizer")


def _vocab_size(model: nn.Module) -> int:
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


# Rows of [M, V] logits the distillation loss reads at a time: about 2^20 values (4 MB in float32),
# so each chunk's temporaries stay in cache.
KD_CHUNK_VALUES = 1 << 20


class _KLFromTeacher(torch.autograd.Function):
    """Sum over rows of KL(softmax(t / T) || softmax(s / T)) for logits s, t [M, V], with the
    gradient for s found in the same pass, a chunk of rows at a time.

    Per row, with z = logsumexp: KL = sum_v p_t (t - s) / T + z(s / T) - z(t / T) (as sum_v p_t = 1),
    and d KL / d s = (p_s - p_t) / T. Two exponentials per value and nothing kept but the gradient
    ([M, V] in s's dtype), where autograd's log_softmax, kl_div and their backward take five and
    keep two float32 [M, V] (2048 x 49152 logits in bfloat16: 0.55 s against 1.8 s on a 2-core AMD EPYC).
    The teacher ``t`` gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        rows = max(1, KD_CHUNK_VALUES // max(s.shape[-1], 1))
        grad = torch.empty_like(s)
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in range(0, s.shape[0], rows):
            a, b = s[i : i + rows].float(), t[i : i + rows].float()  # [r, V]
            if temperature != 1.0:
                a, b = a / temperature, b / temperature
            a_max, b_max = a.amax(-1, keepdim=True), b.amax(-1, keepdim=True)
            ea, eb = (a - a_max).exp_(), (b - b_max).exp_()
            za, zb = ea.sum(-1, keepdim=True), eb.sum(-1, keepdim=True)
            pb = eb.div_(zb)
            kl = (pb * (b - a)).sum(-1, keepdim=True) + (a_max + za.log()) - (b_max + zb.log())  # [r, 1]
            total += kl.sum(dtype=torch.float64)
            grad[i : i + rows] = ea.div_(za).sub_(pb).div_(temperature)
        ctx.save_for_backward(grad)
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) at ``temperature``, times temperature^2.

    Both [B, T, V] (or [M, V]: the positions alone); computed in float32 whatever the autocast
    dtype, a chunk of positions at a time (:class:`_KLFromTeacher`). ``mask`` [B, T] (bool): the
    tokens counted as targets; position t predicts token t + 1, so it counts where
    ``mask[:, t + 1]`` does (None: every position).
    """
    V = student_logits.shape[-1]
    if mask is None:
        s, t = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    else:
        counted = mask[:, 1:].to(student_logits.device)  # [B, T - 1]
        s, t = student_logits[:, :-1][counted], teacher_logits[:, :-1][counted]  # [M, V]
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0  # nothing counted: no loss, and the graph stays whole
    return _KLFromTeacher.apply(s, t.detach(), temperature) / s.shape[0] * temperature**2


def predicting(mask: torch.Tensor) -> torch.Tensor:
    """The positions whose next token ``mask`` [B, T] counts as a target ([B, T] bool; the last never)."""
    at = torch.zeros_like(mask, dtype=torch.bool)
    at[:, :-1] = mask[:, 1:]
    return at


@contextmanager
def head_at(model: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within, the model's output head reads only ``positions`` ([B, T] bool) of its input: logits
    [1, M, V] for the M positions a loss counts, in order, instead of [B, T, V].

    A chat model's loss counts the assistant's turns alone: the head (a fifth of SmolLM2's
    weights) and the distillation's softmaxes over the whole vocabulary then run on those tokens
    only. The hook leaves an input of another shape alone (a model that cut its hidden states
    first), so callers check the logits' shape and fall back to ``mask``-ed losses.
    """
    head = model.get_output_embeddings()
    if head is None:
        yield
        return

    def keep(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if x.dim() != 3 or x.shape[:2] != positions.shape:
            return None
        return (x[positions.to(x.device)].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: token t predicts token t + 1. logits [B, T, V], ids [B, T];
    ``mask`` [B, T] (bool): the target tokens counted (None: all)."""
    if mask is None:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    counted = mask[:, 1:].flatten().to(logits.device)
    per = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return (per * counted).sum() / counted.sum().clamp_min(1)


def _counted_logits(logits: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """[M, V] logits at the positions ``at`` ([B, T] bool), from a :func:`head_at` forward's
    [1, M, V], or from [B, T, V] where the hook left the head alone."""
    if logits.dim() == 3 and logits.shape[:2] == at.shape:  # M < B * T: never the hook's [1, M]
        return logits[at.to(logits.device)]
    return logits.reshape(-1, logits.shape[-1])


def batch_loss(
    model: nn.Module,
    ids: torch.Tensor,
    counted: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """One batch's loss: KL from ``teacher`` (:func:`kd_loss`), or next-token cross-entropy
    without one; ``ids`` [B, T], ``counted`` [B, T] (bool) the target tokens (None: all).

    With ``counted``, both models' heads run at the counted positions alone (:func:`head_at`);
    the loss is the one :func:`kd_loss` and :func:`lm_loss` give on whole logits and the mask.
    """
    if counted is None:
        logits = model(input_ids=ids, use_cache=False).logits
        if teacher is None:
            return lm_loss(logits, ids)
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        return kd_loss(logits, target, temperature)
    at = predicting(counted.to(ids.device))
    with head_at(model, at):
        logits = _counted_logits(model(input_ids=ids, use_cache=False).logits, at)  # [M, V]
    if teacher is None:
        targets = ids[:, 1:][counted[:, 1:].to(ids.device)]  # [M], in the positions' order
        if targets.numel() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), targets.to(logits.device))
    with torch.no_grad(), head_at(teacher, at):
        target = _counted_logits(teacher(input_ids=ids, use_cache=False).logits, at)
    return kd_loss(logits, target, temperature)


class RowOrder:
    """Which training rows the i-th row of the run is: a fresh seeded shuffle every epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __getitem__(self, i: int) -> int:
        epoch, pos = divmod(i, self.n)
        if epoch not in self._perms:
            self._perms = {
                epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            }
        return int(self._perms[epoch][pos])


#: Steps a time budget times before it plans the schedule; the first (slower: one-time
#: allocations) is left out of the estimate.
BUDGET_PROBE_STEPS = 4


def steps_within(
    budget: float, spent: float, step: int, per_step: float, per_validation: float, every: int, cap: int
) -> int:
    """The last step a run now at ``step``, ``spent`` of its ``budget`` seconds gone, reaches in
    time when each further step takes ``per_step`` and each validation ``per_validation`` (at
    every ``every``-th step and at the last); at most ``cap``, at least ``step``."""

    def cost(n: int) -> float:  # n more steps and their validations (never fewer for more steps)
        end = step + n
        validations = end // every - step // every + (1 if n and end % every else 0)
        return n * per_step + validations * per_validation

    lo, hi = 0, max(0, cap - step)
    while lo < hi:  # the most steps that fit
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget - spent else (lo, mid - 1)
    return step + lo


def schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def checkpoint_layers(model: nn.Module, spec: Any) -> None:
    """Recompute each decoder layer in the backward pass (gradient checkpointing), any family.
    Undone by deleting the instance attribute ``forward`` again."""
    for layer in get_layers(model, spec):
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def mean_nll(
    model: nn.Module,
    ids: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    mask: torch.Tensor | None = None,
) -> float:
    """Mean next-token NLL over the rows ``ids`` [N, T] (the tokens ``mask`` counts; the model put in eval mode)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        part = None if mask is None else mask[start : start + batch_size]
        with _autocast(device, dtype):
            loss = batch_loss(model, batch, part)
        n = batch[:, 1:].numel() if part is None else int(part[:, 1:].sum())
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def _average(ranks: TorchDistributedReduction, params: dict[str, nn.Parameter], loss: float) -> float:
    """Average the gradients (in place) and the step's loss over the processes; one all-reduce of
    everything flattened (a parameter with no gradient on every process, being the same model, is skipped alike)."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads))  # float32 weights: float32 gradients
    flat = torch.cat(
        [g.reshape(-1).to(dtype) for g in grads] + [torch.tensor([loss], dtype=dtype, device=grads[0].device)]
    )
    ranks.sum_([flat])
    flat /= ranks.processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return float(flat[-1])


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    seen: set[int] = set()
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def recover(
    student: nn.Module,
    tokenizer: Any,
    config: RecoverConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    teacher_tokenizer: Any | None = None,
    teacher_name: str | None = None,
    rows: tuple[Rows, Rows] | None = None,
    eval_ids: torch.Tensor | Rows | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    adapter_dir: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    ranks: TorchDistributedReduction | None = None,
) -> tuple[nn.Module, RecoveryReport]:
    """Train ``student`` to recover quality; returns (the trained model, its report).

    ``teacher`` (with ``loss`` 'kd', the default when given) is the dense model the student was
    compressed from; it only runs forward, under ``no_grad``. ``rows`` is (training, validation)
    rows; default: drawn from ``config.data``. ``eval_ids`` [N, T] is measured every
    ``eval_every`` steps for the curve only. ``state_dir`` receives a checkpoint every
    ``checkpoint_every`` steps; ``resume`` continues from the one there. ``adapter_dir`` (LoRA)
    saves the adapter alone before merging. ``stop_after`` ends the run after that many steps of
    this call (as a crash would; for tests). With LoRA the returned model is the student with
    the adapters merged (the same object); otherwise the student itself.

    ``ranks``: data-parallel under torchrun. Every process holds the whole model and takes rows
    ``rank::N`` of each batch (``batch_size`` a multiple of N); the gradients are averaged over the
    processes before clipping, which with rows of equal length is the one-process gradient of
    the whole batch, so every process takes the same step and the run follows a one-process
    run's (LoRA dropout aside: its masks are drawn per process). Validation runs on every process
    (the same numbers, so early stopping agrees); ``state_dir`` and ``adapter_dir`` are for rank 0
    alone to pass.
    """
    config = config or RecoverConfig()
    loss_kind = config.loss_for(teacher is not None)
    if teacher is not None and loss_kind == "kd":
        check_teacher(student, tokenizer, teacher, teacher_tokenizer)
    if rows is None:  # the default data for this model ('auto'), recorded as it ran
        config = replace(config, data=resolve_auto(config.data, tokenizer))
    device = check_device(config.device)
    amp = parse_dtype(config.dtype)
    spec = spec_for_config(student.config)
    seqlen = clip_seqlen(student, config.seqlen)
    train, val = rows or training_rows(
        teacher,
        tokenizer,
        config.data,
        seqlen=seqlen,
        val_rows=config.val_rows,
        seed=config.seed,
        bos=bos_for(student, tokenizer),
        rows_needed=config.rows_needed(),
        assistant_only=config.assistant_only(is_conversations(config.data)),
        device=config.device,
        progress=progress,
    )
    state_dir = Path(state_dir) if state_dir is not None else None
    print_ = tqdm.write if progress else (lambda *_: None)
    world, rank = (1, 0) if ranks is None else (ranks.processes, ranks.rank)
    if config.batch_size % world:
        raise ValueError(
            f"`batch_size` {config.batch_size} is not a multiple of the {world} processes (each takes an equal share "
            "of every batch)"
        )

    # Seeded inside a forked RNG: adapters' initialisation and dropout are reproducible, and the
    # caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        if config.train == "lora":
            model = lora.wrap(student, spec, config)
        else:
            model = student
            for p in model.parameters():
                p.requires_grad_(True)
        model.to(device)
        if teacher is not None and loss_kind == "kd":
            # The teacher only runs forward: under autocast it is kept in the half dtype outright
            # (half the memory, no per-step weight casts).
            teacher.to(device=device, dtype=amp if amp in (torch.float16, torch.bfloat16) else None).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        if config.gradient_checkpointing:
            checkpoint_layers(model, spec)
        params = _trainable(model)
        optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
        total = config.steps()
        # the schedule reads the planned total when it is asked, so a time budget can plan it again
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, config.warmup, total))
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

        fp = fingerprint(
            getattr(student, "slicegpt_metadata", None) or student.config.to_dict(),
            teacher_name if loss_kind == "kd" else None,
            {**config.to_dict(), "loss": loss_kind},
            train.input_ids,
        )
        step, tokens, seconds = 0, 0, 0.0
        val_seconds, validations, planned = 0.0, 0, None  # what a time budget counts and plans
        curve: list[dict[str, float]] = []
        best: tuple[float, int | None] = (math.inf, None)
        best_state: dict[str, torch.Tensor] | None = None
        bad, resumed_at = 0, None
        if resume and state_dir is not None:
            saved = load_state(state_dir)
            if saved is None:
                print_(f"nothing to resume in {state_dir}: starting from the beginning")
            else:
                check_fingerprint(saved["fingerprint"], fp, state_dir)
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(saved["trainable"][name])
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                scaler.load_state_dict(saved["scaler"])
                torch.set_rng_state(saved["rng"])
                step, tokens, seconds = saved["step"], saved["tokens"], saved["seconds"]
                curve, best, bad = saved["curve"], (saved["best_val"], saved["best_step"]), saved["bad"]
                best_state = saved.get("best_state")
                total, planned = saved.get("total", total), saved.get("planned")
                val_seconds, validations = saved.get("val_seconds", 0.0), saved.get("validations", 0)
                resumed_at = step
                print_(f"resuming at step {step} of {total} from {state_dir}")

        order = RowOrder(len(train), config.seed)

        def batch(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Training batch ``i``: ids [batch, T] and the loss mask (None: every token counts)."""
            start = i * config.batch_size
            pick = [order[start + j] for j in range(config.batch_size)]
            return train.input_ids[pick], None if train.loss_mask is None else train.loss_mask[pick]

        def validate(at: int) -> bool:
            """Append a point to the curve; True when early stopping says stop."""
            nonlocal best, best_state, bad, val_seconds, validations
            t0 = time.perf_counter()
            point = {
                "step": at,
                "tokens": tokens,
                "val_ppl": math.exp(mean_nll(model, val.input_ids, device, amp, config.batch_size, val.loss_mask)),
            }
            if eval_ids is not None:
                ev = eval_ids if isinstance(eval_ids, Rows) else Rows(eval_ids)
                point["eval_ppl"] = math.exp(
                    mean_nll(model, ev.input_ids, device, amp, config.batch_size, ev.loss_mask)
                )
            curve.append(point)
            if point["val_ppl"] < best[0]:
                best, bad = (point["val_ppl"], at), 0
                if config.early_stop_patience is not None or config.time_budget is not None:
                    best_state = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
            else:
                bad += 1
            val_seconds, validations = val_seconds + time.perf_counter() - t0, validations + 1
            print_(
                f"step {at}: validation perplexity {point['val_ppl']:.3f}"
                + (f", {label(config.eval_data or '')} {point['eval_ppl']:.3f}" if "eval_ppl" in point else "")
            )
            return config.early_stop_patience is not None and bad >= config.early_stop_patience

        def numerical_stop(what: str, at: int) -> TrainingError:
            good = state_dir if state_dir is not None and (state_dir / STATE_FILE).is_file() else "none"
            return TrainingError(f"{what} at step {at}; last good checkpoint: {good}")

        def checkpoint() -> None:
            if state_dir is None:
                return
            save_state(
                state_dir,
                {
                    "fingerprint": fp,
                    "step": step,
                    "tokens": tokens,
                    "seconds": seconds,
                    "trainable": {n: p.detach().to("cpu") for n, p in params.items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "curve": curve,
                    "best_val": best[0],
                    "best_step": best[1],
                    "bad": bad,
                    "best_state": best_state,
                    "total": total,
                    "planned": planned,
                    "val_seconds": val_seconds,
                    "validations": validations,
                },
            )

        def agreed(value: int) -> int:
            """One process's ``value`` for all (what a time budget decides, timed on each)."""
            if ranks is None:
                return value
            return int(ranks.agree(torch.tensor([value], dtype=torch.int64)).item())

        if step == 0 and not curve:
            validate(0)
        stopped_early = on_time = False
        done_here = 0
        durations: list[float] = []  # this call's steps, for a time budget's plan
        bar = tqdm(
            total=total, initial=step, desc=f"recover ({loss_kind}, {config.train})", unit="step", disable=not progress
        )
        while step < total and not stopped_early:
            if stop_after is not None and done_here >= stop_after:
                break
            t0 = time.perf_counter()
            model.train()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(config.grad_accum):
                ids, counted = batch(step * config.grad_accum + micro)
                ids, counted = ids[rank::world].to(device), None if counted is None else counted[rank::world].to(device)
                with _autocast(device, amp):
                    loss = batch_loss(model, ids, counted, teacher if loss_kind == "kd" else None, config.temperature)
                if not torch.isfinite(loss.detach()):
                    raise numerical_stop(f"the loss is {float(loss.detach())}", step + 1)
                scaler.scale(loss / config.grad_accum).backward()
                step_loss += float(loss.detach()) / config.grad_accum
                del loss
            if ranks is not None:
                step_loss = _average(ranks, params, step_loss)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            if not torch.isfinite(norm) and amp != torch.float16:
                raise numerical_stop(f"the gradient norm is {float(norm)}", step + 1)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            done_here += 1
            durations.append(time.perf_counter() - t0)
            seconds += durations[-1]
            # planned once the first steps are timed, then again at every validation from all the
            # steps timed so far, so that a slow start (another job, a cold cache) does not leave
            # the budget unspent
            if (
                config.time_budget is not None
                and len(durations) > BUDGET_PROBE_STEPS
                and (planned is None or step % config.eval_every == 0)
            ):
                before = planned
                per_step, per_validation = statistics.median(durations[1:]), val_seconds / max(validations, 1)
                # what is gone, and this step's validation when it is one (it runs next)
                gone = seconds + val_seconds + (per_validation if step % config.eval_every == 0 else 0)
                total = planned = agreed(
                    steps_within(
                        config.time_budget,
                        gone,
                        step,
                        per_step,
                        per_validation,
                        config.eval_every,
                        config.steps(),  # at most the steps asked for
                    )
                )
                bar.total = total
                bar.refresh()
                if planned != before:
                    print_(
                        f"time budget {config.time_budget:.0f} s: {per_step:.2f} s a step, {total} steps planned"
                        + ("" if before is None else f" (was {before})")
                    )
            scheduler.step()  # after any plan: the next step's rate comes from the planned total
            tokens += config.grad_accum * config.batch_size * train.input_ids.shape[1]
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
            validated = step % config.eval_every == 0 or step == total
            if validated:
                stopped_early = validate(step)
            if config.time_budget is not None and step < total and not stopped_early:
                on_time = bool(agreed(int(seconds + val_seconds >= config.time_budget)))
                if on_time:
                    print_(f"time budget {config.time_budget:.0f} s spent at step {step} of {total}")
                    if not validated:
                        validate(step)
                    break
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint()
        bar.close()

        if best_state is not None and best[1] is not None and best[1] != step:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(best_state[name])
            print_(f"kept the best validation state, step {best[1]} ({best[0]:.3f})")
        if config.gradient_checkpointing:
            for layer in get_layers(student, spec):
                layer.__dict__.pop("forward", None)
        if config.train == "lora":
            if adapter_dir is not None:
                lora.save_adapter(model, str(adapter_dir))
            model = lora.merge(model)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    report = RecoveryReport(
        loss=loss_kind,
        train=config.train,
        data=label(config.data),
        teacher=teacher_name if loss_kind == "kd" else None,
        steps=step,
        tokens=tokens,
        seconds=seconds,
        trainable_parameters=sum(p.numel() for p in params.values()),
        settings=config.to_dict(),
        curve=curve,
        best_step=best[1] if best_state is not None else None,
        stopped_early=stopped_early,
        resumed_at_step=resumed_at,
        data_sha256=hashlib.sha256(train.input_ids.numpy().tobytes()).hexdigest(),
        planned_steps=planned,
        stopped_on_time=on_time,
    )
    model.slicegpt_recovery = report
    warning = report.warning()
    if warning:
        log.warning(warning)
    return model, report
