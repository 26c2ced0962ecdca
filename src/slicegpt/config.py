"""Typed settings: the single source of defaults for the API and the CLI."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# Other spellings of the same dtypes, accepted wherever a dtype name is parsed (the benchmark's
# --dtype offers them); a "torch." prefix and any letter case are accepted too.
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}


# How library messages name a setting: `seqlen`, `axes=residual`, `verify=False` (the names of
# the settings dataclasses' fields). The command line shows them as its flags (flags()).
_SETTING = re.compile(r"(?<!`)`([a-z][a-z0-9_]*)(?:=([^`]*))?`(?!`)")


def flags(message: str) -> str:
    """``message`` with the settings it names as command-line flags: `seqlen` -> --seqlen,
    `axes=residual` -> --axes residual, `verify=False` -> --no-verify, `uniform=True` -> --uniform."""

    def flag(m: re.Match) -> str:
        if m.group(1) not in _setting_names():
            return m.group(0)
        name, value = m.group(1).replace("_", "-"), m.group(2)
        if value == "False":
            return f"--no-{name}"
        return f"--{name}" if value in (None, "True") else f"--{name} {value}"

    return _SETTING.sub(flag, message)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype a name stands for (a :data:`DTYPES` key or a :data:`DTYPE_ALIASES` spelling)."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    try:
        return DTYPES[DTYPE_ALIASES.get(key, key)]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name of a dtype: torch.bfloat16, 'bf16' -> 'bfloat16'."""
    return str(parse_dtype(dtype)).removeprefix("torch.")


def check_device(device: str | torch.device) -> torch.device:
    """The device, or a one-line error when it cannot be used here (CUDA asked for, none present)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:1, mps ...") from exc
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no data: nothing can be computed there; use cpu, cuda, ...")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but MPS is not available on this machine")
    return dev


def parse_device_map(text: str | None) -> str | tuple[str, ...] | None:
    """None, 'auto', or the devices of a comma-separated list ('cuda:0,cuda:1'); a one-line error
    for anything else (devices are parsed here, and checked against the machine when used)."""
    if text is None:
        return None
    text = str(text).strip()
    if text == "auto":
        return "auto"
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError("device_map is empty: use 'auto' or a comma-separated list of devices such as 'cuda:0,cuda:1'")
    for name in names:
        try:
            torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device_map: unknown device {name!r}; use 'auto' or a list such as 'cuda:0,cuda:1'"
            ) from None
    return names


def _number(name: str, value: Any, kind: type = float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise TypeError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")


# With a parameter target and both axes: the share of what is removed that the residual width
# takes; the rest comes from MLP neurons (see README "Parameter budgets" for the measurements).
DEFAULT_RESIDUAL_SHARE = 0.0
#: The size when none is given: 75% of the parameters as shipped (the budget method, the best measured).
DEFAULT_TARGET = 0.75


@dataclass
class SliceConfig:
    """How to slice.

    The size: ``target_params`` (a parameter budget; it wins over ``sparsity``) or ``sparsity``
    (the paper's share of the width); neither given is the best measured default, 75% of the
    parameters as shipped (:data:`DEFAULT_TARGET`). :meth:`resolved` gives the settings as they run.

    sparsity: share of the hidden width removed at every layer, in [0, 1).
    round_to: kept width rounded down to a multiple of this (8 keeps matmuls aligned).
    calib: calibration data (see :mod:`slicegpt.sources`): 'wiki' (built-in, offline), 'wikitext2'
        (hub), a .txt/.jsonl path, a .jsonl of conversations, 'self' (the model's own answers to
        built-in prompts), a mix 'wiki+self'; 'auto' (the default): for a model with a chat
        template sliced in memory, ``nsamples`` rows of 'wiki' and as many again of its own
        conversations on top ('wiki+self' on 2 x ``nsamples`` rows: measured best for the chat
        job, within 5% of prose alone's perplexity), 'wiki' otherwise.
    nsamples, seqlen: calibration rows and their length in tokens (seqlen clipped to the context);
        with ``calib='auto'`` on a chat model, its prose rows (its own conversations come on top).
    batch_size: calibration rows per forward pass.
    device: where each layer is processed (the rest of the model stays on the host).
    device_map: several devices in this process instead of one ``device``, for a model larger
        than one accelerator: 'auto' (the model's own ``hf_device_map`` when it was loaded with
        one, else every CUDA device) or a comma-separated list ('cuda:0,cuda:1'), the layers
        split evenly in order. Each layer is calibrated and sliced on its device and stays there;
        the sliced model is dispatched over them (accelerate) and runs as one. In memory only
        (the host holds the model while it is sliced).
    dtype: the dtype the model is loaded and sliced in; PCA is always float64.
    seed: draws the calibration rows.
    slice_head: also slice the last layer's output and the head's input.
    damping: added to the covariance diagonal, as a share of its mean.
    pca_signal: 'residual' = PCA of the residual stream where each branch reads it (before the
        norm, as the reference implementation does); 'normed' = PCA of the normalised signal
        (as the paper's text describes). On SmolLM2 at 25%, residual gives perplexity 78.9 and
        normed 135 on the first 40 'wiki' evaluation rows: tokens with very large activations
        carry directions the model needs, and normalising first hides them.
    uniform: one rotation for the whole network (PCA of all points' pooled, trace-normalised
        covariances): no shortcut matrices, and the result is a standard checkpoint of the same
        family with a smaller hidden_size. Implies slicing the head. None: True with a
        parameter target (a checkpoint every runtime loads), False with ``sparsity`` (the paper's).
    target_params: a parameter budget instead of ``sparsity``: a count (> 1), or a fraction
        (0, 1] of the parameters as shipped (tied weights counted once). The saved model's count
        (shortcut matrices, an untied head, explicit norms included) never exceeds it.
    axes: where a target's budget is spent, comma-separated: 'residual' (the stream's width,
        SliceGPT as in the paper) and 'mlp' (MLP intermediate neurons, the same number in every
        layer, chosen greedily from calibration statistics with the down projection refit; in
        MoE families every routed expert keeps that many of its own).
    residual_share: with both axes, the share of the parameters to remove that the residual
        width takes (None: DEFAULT_RESIDUAL_SHARE, the best measured split).
    correct: closed-form corrections: refit each branch's output projection (o_proj, down_proj, ...)
        so that the compressed model's stream after the branch matches the dense model's, by ridge
        least squares toward the current weights, the strength chosen on held-out calibration rows;
        with MLP neurons pruned, they are also chosen for that target. None: on with a parameter
        target (the best measured), off for the paper's ``sparsity``.
        Costs one more pass of the dense model and one of each branch.
    token_weighting: how calibration tokens count in MLP neuron selection and refits: 'none'
        (equally) or 'norm' (by 1 / the mean square of the stream the MLP writes into, so that the
        few tokens with massive activations do not decide the fit).
    verify: before anything is sliced, run the first calibration row (32 tokens) through the model
        as loaded and as made invariant (norms folded, blocks rewired), and refuse to go on if the
        logits differ beyond the dtype's rounding: a family the spec describes wrongly.
    search: with a target and both axes, measure the split instead of using the default: each
        candidate residual share compresses a copy of the model, the lowest loss on 8 further
        calibration rows (held out from every statistic) wins (costs one compression per candidate).
    spread_neurons: per-layer mode with a target spent on MLP neurons alone (the residual width
        whole: the model keeps its basis and a tied head, no shortcut matrices): give the layers
        different neuron counts, the same total, by each layer's error against the neurons it
        keeps (one more pass of the model, layer by layer, over 8 of the calibration rows, then a
        greedy selection to every width per layer). False keeps the same count in every layer.
        Uniform mode keeps one count: a standard config holds one.
    fast_matmul: on a CPU with bfloat16 units (AVX512-BF16), run the compression's float32
        matrix products (forwards, moments) through them: 1.1-2x faster by the CPU (two EPYCs with
        the same flags measured) at float32's accuracy, used only where a probe product made in
        that mode shows it (an AMX Xeon rounds to bfloat16 there, so it keeps IEEE float32;
        :mod:`slicegpt.core.precision`). No effect elsewhere; PCA and the solves stay float64.
    """

    sparsity: float | None = None
    round_to: int = 8
    calib: str = "auto"
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    device: str = "cpu"
    device_map: str | None = None
    dtype: str = "float32"
    seed: int = 42
    slice_head: bool = False
    damping: float = 0.01
    pca_signal: Literal["normed", "residual"] = "residual"
    uniform: bool | None = None
    target_params: float | None = None
    axes: str = "mlp,residual"
    residual_share: float | None = None
    correct: bool | None = None
    search: bool = False
    spread_neurons: bool = True
    token_weighting: Literal["none", "norm"] = "none"
    verify: bool = True
    fast_matmul: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.sparsity is not None:
            _number("sparsity", self.sparsity)
        for name in ("round_to", "nsamples", "seqlen", "batch_size", "seed"):
            _number(name, getattr(self, name), int)
        if self.target_params is not None:
            _number("target_params", self.target_params)
        if self.sparsity is not None and not (0.0 <= float(self.sparsity) < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be at least 1, got {self.round_to}")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError("nsamples and batch_size must be at least 1, seqlen at least 2")
        if self.pca_signal not in ("normed", "residual"):
            raise ValueError(f"pca_signal must be 'normed' or 'residual', got {self.pca_signal!r}")
        if self.target_params is not None and not (
            float(self.target_params) > 0 and math.isfinite(float(self.target_params))
        ):
            raise ValueError(f"target_params must be a positive finite number, got {self.target_params}")
        if (
            self.target_params is not None
            and float(self.target_params) > 1
            and float(self.target_params) != int(self.target_params)
        ):
            raise ValueError(
                f"a target_params above 1 is a parameter count, a whole number (100.9M, 1.2B); got {self.target_params}"
            )
        if self.residual_share is not None and not 0.0 <= float(self.residual_share) <= 1.0:
            raise ValueError(f"residual_share must be in [0, 1], got {self.residual_share}")
        if self.token_weighting not in ("none", "norm"):
            raise ValueError(f"token_weighting must be 'none' or 'norm', got {self.token_weighting!r}")
        if self.target_params is None and self.sparsity is not None:
            unused = [
                name
                for name, on in (
                    ("axes", self.axes != "mlp,residual"),
                    ("residual_share", self.residual_share is not None),
                    ("search", self.search),
                )
                if on
            ]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} only apply with a parameter target (target_params); give one, or drop them"
                )
        if self.damping < 0:
            raise ValueError("damping must be non-negative")
        parse_dtype(self.dtype)
        parse_device_map(self.device_map)

    def resolved(self) -> "SliceConfig":
        """The settings as they run: with no size, the default parameter target; the mode, where
        not given, uniform for a target and per-layer for a sparsity."""
        target = self.target_params if self.target_params is not None or self.sparsity is not None else DEFAULT_TARGET
        uniform = self.uniform if self.uniform is not None else target is not None
        return replace(self, target_params=target, uniform=uniform)

    @property
    def corrections(self) -> bool:
        """Whether closed-form corrections run (``correct``, or its default for the mode)."""
        return self.target_params is not None if self.correct is None else bool(self.correct)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class EvalConfig:
    """How to measure perplexity.

    seqlen: tokens per row (clipped to the model's context); batch_size: rows per forward.
    device_map: run a model too large for one device over several ('auto' or 'cuda:0,cuda:1'),
        as :class:`SliceConfig` places layers; None: all of it on ``device``.
    """

    seqlen: int = 2048
    batch_size: int = 1
    device: str = "cpu"
    device_map: str | None = None
    dtype: str = "float32"
    max_rows: int | None = None


#: LoRA target groups: which of a family's linear layers (named by its ArchSpec) get adapters.
LORA_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass
class RecoverConfig:
    """How to recover a compressed model by training (``slicegpt recover``).

    loss: 'kd' (KL divergence from the dense teacher's next-token distribution to the student's,
        computed batch by batch, never stored) or 'lm' (the plain next-token cross-entropy).
        None: 'kd' when a teacher is given, else 'lm'.
    train: 'all' (every weight of the student, shortcut matrices included) or 'lora' (low-rank
        adapters through peft on ``lora_targets``, merged into the weights at the end; shortcut
        matrices stay trainable).
    lora_rank, lora_alpha, lora_dropout: the adapters (the paper: 32, 10, 0.05).
    lora_targets: comma-separated groups of :data:`LORA_GROUPS` ('attn_in' = q/k/v, 'attn_out' =
        o_proj, 'mlp_in' = gate/up, 'mlp_out' = down; each family's names come from its spec).
    data: training data ('wiki' = the calibration part of the built-in corpus, 'wikitext2' =
        its train split, a .txt/.jsonl file, 'hf:NAME' for a datasets data set, e.g.
        instruction data such as 'hf:tatsu-lab/alpaca'; a .jsonl of conversations; 'self': the
        dense teacher's own answers to the built-in training prompts; a mix 'wiki+self'; 'auto'
        (the default): 'wiki+self' for a model with a chat template, 'wiki' otherwise).
        Never the evaluation part.
    loss_on: which tokens the loss counts: 'assistant' (the assistant's turns of conversations),
        'all', or 'auto' (assistant for conversation data, all for text).
    tokens: training tokens (steps = tokens / (batch_size * grad_accum * seqlen)), unless
        ``max_steps`` is given. The paper's recovery used about 8M.
    lr, warmup, weight_decay: AdamW with linear warm-up over ``warmup`` steps, then cosine decay
        to a tenth of ``lr``.
    seqlen, batch_size, grad_accum: rows of ``seqlen`` tokens, ``batch_size`` per forward,
        ``grad_accum`` forwards per optimiser step.
    temperature: the distillation temperature (the KL is scaled by its square).
    val_rows: rows of the training text held out (never trained on) to measure validation
        perplexity every ``eval_every`` steps; early stopping and the kept best state use it.
    eval_data, eval_max_rows: also measure perplexity on this text's evaluation part every
        ``eval_every`` steps, for the curve only (never used to choose anything).
    early_stop_patience: stop after this many validations without improvement and keep the
        best state (None: train to the end).
    checkpoint_every: write a resumable training checkpoint every N steps (0: never), in a
        staging folder beside the output that ``resume`` continues from.
    time_budget: seconds the training may take, its steps and validations together (None: no
        limit). Once the first few steps are timed, and again at every validation, the schedule
        is planned to end within it (the warm-up, then the cosine over the steps that fit, at
        most those of ``tokens`` or ``max_steps``), and training stops once it is spent; the best
        validated state is kept as with early stopping. Loading, data and saving are outside it.
    device, dtype: where to train; 'bfloat16'/'float16' train under autocast (float32 weights).
    gradient_checkpointing: recompute each layer's activations in the backward pass.
    seed: the order of the training rows and the adapters' initialisation.
    """

    loss: Literal["kd", "lm"] | None = None
    train: Literal["all", "lora"] = "all"
    lora_rank: int = 32
    lora_alpha: float = 10.0
    lora_dropout: float = 0.05
    lora_targets: str = ",".join(LORA_GROUPS)
    data: str = "auto"
    loss_on: Literal["auto", "assistant", "all"] = "auto"
    tokens: int = 8_000_000
    max_steps: int | None = None
    lr: float = 2e-4
    warmup: int = 20
    weight_decay: float = 0.0
    seqlen: int = 1024
    batch_size: int = 4
    grad_accum: int = 1
    temperature: float = 1.0
    val_rows: int = 8
    eval_data: str | None = None
    eval_max_rows: int | None = 32
    eval_every: int = 50
    early_stop_patience: int | None = None
    checkpoint_every: int = 50
    time_budget: float | None = None
    device: str = "cpu"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.loss not in (None, "kd", "lm"):
            raise ValueError(f"loss must be 'kd' or 'lm', got {self.loss!r}")
        if self.train not in ("all", "lora"):
            raise ValueError(f"train must be 'all' or 'lora', got {self.train!r}")
        if self.lora_rank < 1:
            raise ValueError(f"the LoRA rank must be at least 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.target_groups  # validates the names
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and self.tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {self.tokens}")
        if not self.lr > 0 or self.warmup < 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive, warmup and weight_decay non-negative")
        if self.seqlen < 2 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("seqlen must be at least 2, batch_size and grad_accum at least 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.val_rows < 1 or self.eval_every < 1 or self.checkpoint_every < 0:
            raise ValueError("val_rows and eval_every must be at least 1, checkpoint_every non-negative")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ValueError(f"early_stop_patience must be at least 1, got {self.early_stop_patience}")
        if self.time_budget is not None and not (float(self.time_budget) > 0 and math.isfinite(self.time_budget)):
            raise ValueError(f"time_budget must be a positive number of seconds, got {self.time_budget}")
        if self.loss_on not in ("auto", "assistant", "all"):
            raise ValueError(f"loss_on must be 'auto', 'assistant' or 'all', got {self.loss_on!r}")
        parse_dtype(self.dtype)

    def assistant_only(self, conversations: bool) -> bool:
        """Does the loss count the assistant's tokens alone (``loss_on``, for data of this kind)?"""
        return self.loss_on == "assistant" or (self.loss_on == "auto" and conversations)

    def rows_needed(self) -> int:
        """Training rows the run reads (rows repeat, a fresh order each epoch, when the data has fewer)."""
        return self.steps() * self.batch_size * self.grad_accum

    @property
    def target_groups(self) -> tuple[str, ...]:
        groups = tuple(g.strip() for g in self.lora_targets.split(",") if g.strip())
        unknown = [g for g in groups if g not in LORA_GROUPS]
        if unknown or not groups:
            raise ValueError(
                f"unknown LoRA target group {', '.join(unknown) or '(none)'}; choose among {', '.join(LORA_GROUPS)}"
            )
        return groups

    def loss_for(self, has_teacher: bool) -> str:
        """The loss that runs: ``loss``, or kd with a teacher and lm without."""
        if self.loss == "kd" and not has_teacher:
            raise ValueError("loss 'kd' needs a teacher model")
        return self.loss or ("kd" if has_teacher else "lm")

    def steps(self) -> int:
        """Optimiser steps: ``max_steps``, or as many as ``tokens`` takes (at least one)."""
        if self.max_steps is not None:
            return self.max_steps
        per_step = self.batch_size * self.grad_accum * self.seqlen
        return max(1, -(-self.tokens // per_step))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _setting_names() -> set[str]:
    """Every setting a message may name: the settings dataclasses' fields, and the output folder."""
    return {f.name for cls in (SliceConfig, EvalConfig, RecoverConfig) for f in fields(cls)} | {"out"}
