"""Transfer learning: start from pretrained weights, give the model a new head, freeze layers.

Three steps, each a pure function of a model:

- :func:`load_initial_weights` reads a medfed checkpoint or a plain PyTorch ``state_dict``
  file with ``torch.load(weights_only=True)``: tensors only, never pickled objects, so a
  weights file from elsewhere cannot run code at a site;
- :func:`apply_initial_weights` copies every tensor whose name and shape match the model;
  the rest (a classifier head for another number of classes) keep their fresh
  initialisation and are listed in the returned :class:`TransferReport`;
- :func:`freeze` stops training of the parameters named by glob patterns. Federated
  fine-tuning then trains, and exchanges, only the other ones: a site leaves
  :func:`frozen_state_names` out of its reply (``model_to_arrays(model, exclude=...)``).

The optimizers of :mod:`medfed.common.optim` and Opacus's ``DPOptimizer`` skip parameters
with ``requires_grad=False``, so frozen parameters stay bit-identical through
:func:`medfed.common.training.train`, with or without DP-SGD.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from medfed.common.checkpoint import FORMAT, load_checkpoint
from medfed.common.errors import ConfigError, DataError
from medfed.common.models import ModelSpec, strip_wrapper_prefix
from torch import nn

log = logging.getLogger(__name__)

# Final classification layers by module name: SmallCNN, MONAI DenseNet121, MONAI ResNet.
KNOWN_HEADS = ("head", "class_layers.out", "fc")
# Buffers that training updates even when their module's parameters are frozen.
RUNNING_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
MAX_PATTERNS, MAX_PATTERN_LEN = 100, 200
_SHOW = 5


@dataclass(frozen=True)
class TransferReport:
    """What :func:`apply_initial_weights` did, by state_dict key."""

    loaded: tuple[str, ...]
    reinitialised: tuple[str, ...]  # in both, left fresh: shape differs, or new_head asked for
    missing: tuple[str, ...]  # in the model, not in the file: left fresh
    unexpected: tuple[str, ...]  # in the file, not in the model: ignored

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for label, names in (("reinitialised", self.reinitialised), ("missing", self.missing),
                             ("unexpected", self.unexpected)):
            if names:
                parts.append(f"{len(names)} {label} ({_few(names)})")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in asdict(self).items()}


def _strip(name: str) -> str:
    return next(iter(strip_wrapper_prefix({name: None})))


def _few(names: Sequence[str] | set[str] | frozenset[str]) -> str:
    shown = sorted(names)[:_SHOW]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > _SHOW else "")


def load_initial_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    """The tensors of a medfed checkpoint (and its model spec) or of a plain state_dict file.

    A plain file is what ``torch.save(model.state_dict(), path)`` writes, or a dict whose
    ``"state_dict"`` entry is one; it has no spec (``None``). Wrapper prefixes (Opacus
    ``_module.``, DataParallel ``module.``) are stripped.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"initial weights not found: {p} (give a medfed checkpoint or a PyTorch state_dict file)")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or carries pickled objects
        raise DataError(
            f"{p}: not a readable weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "only tensors and plain containers are accepted, never pickled objects: "
            "re-save it with torch.save(model.state_dict(), path)"
        ) from exc
    spec = None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        ckpt = load_checkpoint(p)  # validates the checkpoint's fields
        payload, spec = ckpt.state_dict, ckpt.model
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict):
        raise DataError(f"{p}: holds a {type(payload).__name__}, not a state_dict (a dict of tensors)")
    bad = {str(k): type(v).__name__ for k, v in payload.items() if not isinstance(v, torch.Tensor)}
    if bad or not payload:
        found = ", ".join(f"{k} ({t})" for k, t in sorted(bad.items())[:_SHOW]) or "nothing"
        raise DataError(
            f"{p}: not a state_dict: every value must be a tensor, found {found}; "
            "save model.state_dict(), or a dict with the tensors under 'state_dict'"
        )
    return strip_wrapper_prefix({str(k): v for k, v in payload.items()}), spec


def head_parameter_names(model: nn.Module) -> tuple[str, ...]:
    """State_dict keys of the final classification layer's parameters.

    The head is the last linear module named ``head`` (medfed's SmallCNN),
    ``class_layers.out`` (MONAI DenseNet) or ``fc`` (MONAI ResNet), possibly inside a
    wrapper (``1.class_layers.out``); otherwise the last ``nn.Linear`` of the model.
    """
    linears = [(_strip(n), m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"{type(model).__name__} has no linear classification head, so new-head cannot "
            "be used: leave new-head off (a head of another shape is reinitialised anyway)"
        )
    names = [n for n, _ in linears]
    for suffix in KNOWN_HEADS:
        hits = [i for i, n in enumerate(names) if n == suffix or n.endswith("." + suffix)]
        if hits:
            break
    index = hits[-1] if hits else len(linears) - 1
    prefix, module = linears[index]
    return tuple(f"{prefix}.{k}" for k, _ in module.named_parameters(recurse=False))


def _align_prefix(source: dict[str, torch.Tensor], target: set[str]) -> dict[str, torch.Tensor] | None:
    """``source`` with one leading module name added or dropped so its keys meet the model's
    (a DenseNet saved with or without medfed's upsampling wrapper ``1.``), or None."""
    for keys, add in ((target, True), (set(source), False)):
        firsts = {k.split(".", 1)[0] for k in keys}
        if len(firsts) != 1 or not all("." in k for k in keys):
            continue
        prefix = firsts.pop() + "."
        renamed = ({prefix + k: v for k, v in source.items()} if add
                   else {k.removeprefix(prefix): v for k, v in source.items()})
        if set(renamed) & target:
            log.info("initial weights: keys %s %r to match the model", "given" if add else "stripped of", prefix)
            return renamed
    return None


def apply_initial_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                          strict_shapes: bool = False, new_head: bool = False) -> TransferReport:
    """Copy into ``model`` every tensor of ``state_dict`` whose name and shape match.

    Tensors whose shape (or kind: floating point or not) differs keep the model's fresh
    initialisation (``strict_shapes``: raise instead); with ``new_head`` the classification head (:func:`head_parameter_names`)
    stays fresh even when its shape matches. Raises :class:`ConfigError` if nothing matches.
    """
    target = strip_wrapper_prefix(model.state_dict())
    source = strip_wrapper_prefix(dict(state_dict))
    if not set(source) & set(target):
        source = _align_prefix(source, set(target)) or source
    keep_fresh = set(head_parameter_names(model)) if new_head else set()
    shared = sorted(set(source) & set(target))
    mismatched = [k for k in shared if tuple(source[k].shape) != tuple(target[k].shape)
                  or source[k].is_floating_point() != target[k].is_floating_point()]
    if mismatched and strict_shapes:
        raise ConfigError(
            "initial weights differ in shape from the model: "
            + "; ".join(f"{k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}" for k in mismatched[:_SHOW])
            + " (turn strict shapes off to reinitialise them)"
        )
    loaded = [k for k in shared if k not in keep_fresh and k not in mismatched]
    if not loaded:
        raise ConfigError(
            "the initial weights do not fit this model: no tensor has a matching name and shape "
            f"(model: {_few(set(target))}; file: {_few(set(source))}); "
            "check 'model' in the run config against the architecture the weights were saved from"
        )
    original = {_strip(k): k for k in model.state_dict()}  # keys as the (wrapped) model names them
    with torch.no_grad():
        model.load_state_dict({original[k]: source[k] for k in loaded}, strict=False)
    report = TransferReport(
        loaded=tuple(loaded),
        reinitialised=tuple(k for k in shared if k not in loaded),
        missing=tuple(sorted(set(target) - set(source))),
        unexpected=tuple(sorted(set(source) - set(target))),
    )
    log.info("initial weights: %s", report.summary())
    return report


def _check_patterns(patterns: Sequence[str]) -> list[str]:
    if isinstance(patterns, str):
        raise ConfigError(f"freeze={patterns!r}: give a list of patterns, e.g. [{patterns!r}]")
    if len(patterns) > MAX_PATTERNS:
        raise ConfigError(f"freeze lists {len(patterns)} patterns: at most {MAX_PATTERNS} are allowed")
    bad = [repr(p) for p in patterns if not isinstance(p, str) or not p.strip() or len(p) > MAX_PATTERN_LEN]
    if bad:
        raise ConfigError(
            f"freeze patterns {', '.join(bad)} are not allowed: each is a non-empty string of at "
            f"most {MAX_PATTERN_LEN} characters, e.g. 'features.*'"
        )
    return list(patterns)


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def freeze(model: nn.Module, patterns: Sequence[str]) -> tuple[str, ...]:
    """Stop training of the parameters named by ``patterns``; returns their names.

    A pattern is a shell-style glob (:func:`fnmatch.fnmatchcase`: ``*`` matches anything,
    dots included, ``?`` one character, ``[seq]`` one of seq) on a parameter's state_dict
    key, e.g. ``"features.*"`` or ``"features.0.*"``; a module name alone (``"features.0"``)
    freezes all its parameters. Patterns are plain data from the config: never a regular
    expression, never evaluated (fnmatch's translation has no catastrophic backtracking
    since Python 3.9; count and length are capped). Every pattern must match a parameter,
    and at least one parameter must stay trainable; nothing is changed otherwise.
    """
    params = {_strip(n): p for n, p in model.named_parameters()}
    problems, chosen = [], set()
    for pattern in _check_patterns(patterns):
        hits = {n for n in params if _matches(n, pattern)}
        if not hits:
            problems.append(f"freeze pattern {pattern!r} matches no parameter")
        chosen |= hits
    if problems:
        raise ConfigError("; ".join(problems) + f" (parameters: {_few(set(params))})")
    if chosen and chosen >= {n for n, p in params.items() if p.requires_grad}:
        raise ConfigError(
            f"freeze patterns {list(patterns)} would freeze every trainable parameter: "
            "leave at least the head trainable, e.g. freeze 'features.*' only"
        )
    for name in chosen:
        params[name].requires_grad_(False)
    frozen = tuple(sorted(chosen))
    if frozen:
        log.info("frozen %d of %d parameter tensors (%s)", len(frozen), len(params), _few(frozen))
    return frozen


def frozen_state_names(model: nn.Module) -> frozenset[str]:
    """State_dict keys that training leaves unchanged: sites do not send them.

    These are the parameters with ``requires_grad=False`` and the buffers of modules
    whose parameters are all frozen, except running statistics (BatchNorm's), which
    training updates whatever ``requires_grad`` says. A module without parameters keeps
    its buffers in the exchanged set.
    """
    out = set()
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter):
            if not value.requires_grad:
                out.add(key)
            continue
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        owned = list(module.parameters())
        if leaf not in RUNNING_BUFFERS and owned and not any(p.requires_grad for p in owned):
            out.add(key)
    return frozenset(_strip(k) for k in out)


def trainable_names(model: nn.Module) -> frozenset[str]:
    """State_dict keys that training may change: what a site sends and the server averages.

    The complement of :func:`frozen_state_names` within the model's state_dict keys.
    """
    return frozenset(strip_wrapper_prefix(model.state_dict())) - frozen_state_names(model)


def state_digest(state_dict: Mapping[str, torch.Tensor], names: Sequence[str] | frozenset[str]) -> str:
    """SHA-256 of the named tensors (names, dtypes, shapes, bytes), in name order.

    The server sends the digest of the frozen tensors; a site compares it with its own so a
    site holding other pretrained weights fails loudly instead of training a different body.
    """
    h = hashlib.sha256()
    for name in sorted(names):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

