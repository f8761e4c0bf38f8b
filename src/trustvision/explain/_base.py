"""The explainer contract: one base class, one registry, declared requirements and keywords.

An explanation method is one class deriving from :class:`Explainer` (Captum's contract: built on
the model, one verb ``attribute``). Its class attributes declare what it is, and defining the
class registers it under ``name``, so a new method is one file in ``trustvision/explain/`` (every
module there is imported by the package) and it appears in ``list_methods()``, in
``trustvision explain --method NAME`` and in the audit's ``explanations`` check:

- ``name``: registry key (``"igos++"``); ``title``: display name (``"iGOS++"``);
- ``kind``: ``"heatmap"`` (``attribute`` returns (N, 1, H, W), higher = more important),
  ``"graph"`` / ``"subset"`` / ``"concepts"`` (one result per image, with ``to_json()``,
  ``render(path)`` and ``summary()``);
- ``requires``: requirements a model must meet (``"conv"``: an ``nn.Conv2d`` layer,
  ``"generative"``: a generative classifier); :meth:`Explainer.unmet_requirement` says why a model
  does not meet them, and constructing the method on such a model raises that one-line error;
- ``in_audit``: run by default by the audit; ``order``: its position there (smaller first).

``attribute(inputs, target=None, *, seed=0, internal_batch_size=None, **method_kw)``: every
method accepts ``seed`` (used where the method is random) and ``internal_batch_size`` (most images
per forward pass) and declares its own keywords in its signature; an unknown keyword is a one-line
:class:`~trustvision.errors.TrustVisionError` naming the method's keywords.

Example:
    >>> import torch
    >>> class Brightness(Explainer, register=False):
    ...     name, title = "brightness", "Brightness"
    ...     def attribute(self, inputs, target=None, *, seed=0, internal_batch_size=None, gain=1.0):
    ...         return gain * inputs.mean(1, keepdim=True)
    >>> Brightness.keywords()
    ('seed', 'internal_batch_size', 'gain')
    >>> Brightness(torch.nn.Identity()).attribute(torch.ones(2, 3, 4, 4)).shape
    torch.Size([2, 1, 4, 4])
    >>> Brightness(torch.nn.Identity()).attribute(torch.ones(1, 1, 4, 4), gian=2.0)
    Traceback (most recent call last):
    ...
    trustvision.errors.TrustVisionError: brightness has no keyword 'gian' (did you mean 'gain'?); its keywords are seed, internal_batch_size, gain
"""

from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from trustvision._utils.images import TargetType
from trustvision._utils.registry import Registry
from trustvision.errors import TrustVisionError

__all__ = [
    "Explainer",
    "ExplanationInfo",
    "ExplanationWarning",
    "constant_heatmaps",
    "constant_range",
    "constant_rows",
    "heatmap_reasons",
    "reliability_warning",
    "summarise_reasons",
    "KINDS",
    "REQUIREMENTS",
    "register_method",
    "unregister_method",
    "get",
    "list_methods",
    "method_info",
    "check_keywords",
]

#: what ``attribute`` returns: heatmaps (N, 1, H, W), or one result object per image
KINDS = ("heatmap", "subset", "graph", "concepts")


class ExplanationWarning(UserWarning):
    """Raised (as a warning) when an explanation is likely unreliable for some images."""


def constant_heatmaps(heatmaps: torch.Tensor, atol: float = 0.0, rtol: float = 1e-6) -> list[bool]:
    """Per image, whether its heatmap (N, ...) is constant: max - min <= atol + rtol * max|h|.

    A constant heatmap ranks nothing (deletion / insertion then follow the pixel order, and
    correlation metrics divide by zero), so it is flagged unreliable. (One reduction and one
    transfer; the test itself in Python floats: I-GOS asks it every iteration.)
    """
    flat = heatmaps.detach().flatten(1)
    if flat.dtype != torch.float32:  # (bool or integer maps have no aminmax; bf16 ones are read in float32)
        flat = flat.float()
    if flat.shape[1] == 0:
        return [True] * flat.shape[0]
    lo, hi = torch.aminmax(flat, dim=1)
    return [constant_range(a, b, atol, rtol) for a, b in zip(*torch.stack((lo, hi)).tolist())]


def constant_range(lo: float, hi: float, atol: float = 0.0, rtol: float = 1e-6) -> bool:
    """Whether a heatmap whose values run from ``lo`` to ``hi`` is constant (the test of
    :func:`constant_heatmaps`; NaN counts as constant: a comparison with NaN is false)."""
    return not (hi - lo > atol + rtol * max(-lo, hi))


def constant_rows(heatmaps: torch.Tensor, atol: float = 0.0, rtol: float = 1e-6) -> torch.Tensor:
    """:func:`constant_heatmaps` as a bool tensor (N,) on the heatmaps' device."""
    return torch.tensor(constant_heatmaps(heatmaps, atol, rtol), dtype=torch.bool, device=heatmaps.device)


def heatmap_reasons(
    *,
    constant: list[bool] | None = None,
    low_confidence: list[bool] | None = None,
    not_predicted: list[bool] | None = None,
    target_probability: list[float] | None = None,
    predicted: list[int] | None = None,
    baseline_keeps_class: list[bool] | None = None,
    baseline_probability: list[float] | None = None,
    baseline_name: str | list[str] = "baseline",
    constant_reason: list[str] | None = None,
    threshold: float = 0.5,
) -> list[list[str]]:
    """Why each heatmap is unreliable, in words (an empty list: no known reason). Every argument
    is per image (missing ones are not checked)."""
    lists = [v for v in (constant, low_confidence, not_predicted, baseline_keeps_class) if v is not None]
    n = len(lists[0]) if lists else 0
    out: list[list[str]] = [[] for _ in range(n)]
    p = target_probability or [float("nan")] * n
    for i in range(n):
        if constant is not None and constant[i]:
            out[i].append(constant_reason[i] if constant_reason else "heatmap is constant")
        if baseline_keeps_class is not None and baseline_keeps_class[i]:
            pb = baseline_probability[i] if baseline_probability else float("nan")
            name = baseline_name[i] if isinstance(baseline_name, list) else baseline_name
            out[i].append(f"the baseline keeps the class (p = {pb:.2f} on the {name}, {p[i]:.2f} on the image)")
        if low_confidence is not None and low_confidence[i]:
            out[i].append(f"low confidence (p = {p[i]:.2f} < {threshold:g})")
        if not_predicted is not None and not_predicted[i]:
            pred = f" (the model predicts {predicted[i]})" if predicted else ""
            out[i].append(f"not the predicted class{pred}")
    return out


#: the kinds of reasons (how each reason starts) and their names, singular and plural
_REASON_KINDS = (
    ("heatmap is constant", "constant heatmap", "constant heatmaps"),
    ("the baseline keeps the class", "baseline keeping the class", "baselines keeping the class"),
    ("low confidence", "low confidence", "low confidence"),
    ("not the predicted class", "class not predicted", "classes not predicted"),
)


def summarise_reasons(reasons: list[list[str]]) -> str:
    """``"3 constant heatmaps, 2 baselines keeping the class, 1 low confidence"``: how many
    heatmaps have each kind of reason."""
    counts: dict[tuple[str, str], int] = {}
    for rs in reasons:
        for r in rs:
            kind = next(((one, many) for start, one, many in _REASON_KINDS if r.startswith(start)),
                        (r.split(" (")[0].split(":")[0],) * 2)
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{c} {one if c == 1 else many}" for (one, many), c in counts.items())


def reliability_warning(title: str, info: "ExplanationInfo") -> str | None:
    """The warning text for the unreliable heatmaps of ``info`` (None when all are reliable)."""
    bad = [i for i, u in enumerate(info.unreliable) if u]
    if not bad:
        return None
    n = len(info.target)
    return (f"{title}: {len(bad)} of {n} images have unreliable heatmaps (images {bad[:10]}"
            f"{'...' if len(bad) > 10 else ''}): {summarise_reasons([info.reasons[i] for i in bad])} "
            "(see ExplanationInfo.reasons)")


@dataclass
class ExplanationInfo:
    """Per-image diagnostics of one ``attribute`` call (lists of length N) plus pass counts.

    ``low_confidence[i]``: the model's probability of the explained class is below the
    threshold; ``not_predicted[i]``: the explained class is not the model's prediction (e.g. a
    wrong prediction when the target is the true label). I-GOS works poorly in both cases.
    ``constant[i]``: the heatmap is constant (max - min below a small tolerance: the mask did not
    move), so it ranks nothing. ``baseline_probability[i]``: the model's probability of the class
    on the baseline image; ``baseline_keeps_class[i]``: it is at least half of that on the image
    (deleting pixels then cannot remove the class); ``baseline_name[i]``: what the baseline was
    ("blurred image", "mean-colour image", "grey image", ...). ``line_search_failures[i]``: iterations in
    which no step was accepted; ``accepted_steps[i]``: iterations whose step changed the mask;
    ``area_weight[i]``: the weight of the area term at the end (``l1``, or lower where the mask did
    not move at ``l1``); ``noise_std[i]``: the std of the integrated-gradient noise used (the
    requested one, or lower where that much noise alone changed the model's mind).
    ``forward_backward_passes`` / ``forward_passes`` count single-image evaluations in total.

    ``reasons[i]`` says in words why heatmap ``i`` is unreliable (e.g. "heatmap is constant: no
    step of the mask optimisation was accepted", "the baseline keeps the class (p = 0.97 on the
    blurred image, 0.99 on the image)", "low confidence (p = 0.42 < 0.5)", "not the predicted
    class (the model predicts 3)"); ``unreliable[i]`` is true when there is any.
    """

    target: list[int]
    target_probability: list[float]
    predicted: list[int]
    low_confidence: list[bool]
    not_predicted: list[bool]
    final_loss: list[float]
    forward_backward_passes: int = 0
    forward_passes: int = 0
    line_search_failures: list[int] = field(default_factory=list)
    accepted_steps: list[int] = field(default_factory=list)
    area_weight: list[float] = field(default_factory=list)
    noise_std: list[float] = field(default_factory=list)
    constant: list[bool] = field(default_factory=list)
    baseline_probability: list[float] = field(default_factory=list)
    baseline_keeps_class: list[bool] = field(default_factory=list)
    low_confidence_threshold: float = 0.5
    baseline_name: str | list[str] = "baseline"

    @property
    def reasons(self) -> list[list[str]]:
        n = len(self.target)
        constant_reason = None
        if self.constant and self.accepted_steps:
            fails = self.line_search_failures or [0] * n
            constant_reason = [
                "heatmap is constant: no step of the mask optimisation was accepted" if moved == 0 and f > 0
                else "heatmap is constant: the mask never left M = 1 (the area penalty outweighs the class "
                     "score's gradient in every cell)" if moved == 0
                else "heatmap is constant: the mask ended with every cell equal"
                for moved, f in zip(self.accepted_steps, fails)
            ]
        return heatmap_reasons(
            constant=self.constant or None, low_confidence=self.low_confidence,
            not_predicted=self.not_predicted, target_probability=self.target_probability,
            predicted=self.predicted, baseline_keeps_class=self.baseline_keeps_class or None,
            baseline_probability=self.baseline_probability or None, baseline_name=self.baseline_name,
            constant_reason=constant_reason, threshold=self.low_confidence_threshold,
        )

    @property
    def unreliable(self) -> list[bool]:
        return [bool(r) for r in self.reasons]

    @classmethod
    def concat(cls, infos: "list[ExplanationInfo]") -> "ExplanationInfo":
        """The diagnostics of the images of several calls, in order (per-image lists joined,
        pass counts added); what one call on all the images would report, since each image's
        result does not depend on the others of its batch."""
        if not infos:
            raise ValueError("concat needs at least one ExplanationInfo")
        if len(infos) == 1:
            return infos[0]
        kw: dict[str, Any] = {}
        for f in fields(cls):
            values = [getattr(i, f.name) for i in infos]
            if f.name in ("forward_backward_passes", "forward_passes"):
                kw[f.name] = sum(values)
            elif f.name == "low_confidence_threshold":
                kw[f.name] = values[0]
            elif f.name == "baseline_name":
                if all(isinstance(v, str) for v in values) and len(set(values)) == 1:
                    kw[f.name] = values[0]
                else:
                    kw[f.name] = [name for v, i in zip(values, infos)
                                  for name in (v if isinstance(v, list) else [v] * len(i.target))]
            else:
                kw[f.name] = [x for v in values for x in v]
        return cls(**kw)

    def to_json(self) -> dict:
        d = asdict(self)
        d["unreliable"] = self.unreliable
        d["reasons"] = self.reasons
        return d


# -- requirements ----------------------------------------------------------------------------


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _is_generative(model: nn.Module) -> bool:
    from trustvision.models import is_generative

    return is_generative(model)


#: requirement -> (test on the model, one-line reason when it fails; ``{method}``, ``{model}`` and
#: ``{others}`` (the heatmap methods this model can use) are filled in)
REQUIREMENTS: dict[str, tuple[Callable[[nn.Module], bool], str]] = {
    "conv": (_has_conv, "{method} needs a convolutional network (no Conv2d layer found); use {others} "
                        "instead"),
    "generative": (_is_generative, "{method} needs a generative classifier (e.g. --model ibinn-small); "
                                   "{model} has no latent space with class means"),
}


# -- the base class --------------------------------------------------------------------------

_CORE = ("inputs", "target")
_SHARED = ("seed", "internal_batch_size")


class Explainer:
    """Base class of the explanation methods (see the module docstring for the contract).

    Subclasses set the class attributes and define ``attribute``; a subclass that sets ``name``
    registers itself (``class Foo(Explainer, register=False)`` opts out, e.g. for a base class).

    Args:
        model: classifier on [0, 1] images (N, C, H, W) returning logits.
        check_requirements: refuse a model that does not meet ``requires`` (one-line error).
    """

    #: registry key (``trustvision explain --method NAME``)
    name: ClassVar[str] = ""
    #: display name (figures, tables, the report)
    title: ClassVar[str] = ""
    #: "heatmap", "subset", "graph" or "concepts" (see :data:`KINDS`)
    kind: ClassVar[str] = "heatmap"
    #: requirements a model must meet (keys of :data:`REQUIREMENTS`)
    requires: ClassVar[tuple[str, ...]] = ()
    #: run by default by the audit's ``explanations`` check
    in_audit: ClassVar[bool] = False
    #: position in the audit's figures and tables (smaller first; ties by name)
    order: ClassVar[int] = 100

    def __init_subclass__(cls, register: bool = True, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "attribute" in cls.__dict__:
            cls.attribute = _checked_attribute(cls, cls.__dict__["attribute"])  # type: ignore[method-assign]
        if register and cls.__dict__.get("name"):
            _register(cls)

    def __init__(self, model: nn.Module, *, check_requirements: bool = True):
        if check_requirements:
            reason = type(self).unmet_requirement(model)
            if reason is not None:
                raise TrustVisionError(reason)
        self.model = model
        #: diagnostics of the last call, for methods that have them (:class:`ExplanationInfo`)
        self.last_info: ExplanationInfo | None = None

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetType = None,
        *,
        seed: int = 0,
        internal_batch_size: int | None = None,
        **method_kw: Any,
    ) -> Any:
        """Explain ``inputs`` (N, C, H, W) in [0, 1] for class ``target`` (``None`` = predicted).

        Heatmap methods return (N, 1, H, W), higher = more important; other kinds one result
        per image.
        """
        raise NotImplementedError

    @classmethod
    def unmet_requirement(cls, model: nn.Module) -> str | None:
        """Why ``model`` cannot be explained by this method (one line), or None if it can."""
        for req in cls.requires:
            test, reason = REQUIREMENTS[req]
            if not test(model):
                others = [n for n in list_methods("heatmap") if n != cls.name
                          and not get(n).requires]
                return reason.format(method=cls.name or cls.__name__, model=type(model).__name__,
                                     others=", ".join(others) or "another method")
        return None

    @classmethod
    def keywords(cls) -> tuple[str, ...]:
        """The keywords ``attribute`` accepts besides ``inputs`` and ``target``, in order."""
        return tuple(cls.defaults())

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Keyword -> default value of ``attribute`` (besides ``inputs`` and ``target``)."""
        return {p.name: p.default for p in _parameters(cls.attribute)[1:]
                if p.name not in _CORE and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    @classmethod
    def _accepts_any_keyword(cls) -> bool:
        return any(p.kind is p.VAR_KEYWORD for p in _parameters(cls.attribute))


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable) -> tuple[inspect.Parameter, ...]:
    """The parameters of the function ``fn`` wraps (read once per function: every call of
    ``attribute`` checks its keywords against them)."""
    return tuple(inspect.signature(inspect.unwrap(fn)).parameters.values())


def check_keywords(method: type[Explainer], kw: Mapping[str, Any]) -> None:
    """Raise a one-line :class:`TrustVisionError` if ``kw`` holds a keyword ``method`` lacks."""
    if method._accepts_any_keyword():
        return
    valid = method.keywords()
    bad = [k for k in kw if k not in valid]
    if bad:
        close = difflib.get_close_matches(bad[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TrustVisionError(f"{method.name or method.__name__} has no keyword {bad[0]!r}{hint}; "
                               f"its keywords are {', '.join(valid)}")


def _checked_attribute(cls: type, fn: Callable) -> Callable:
    """``fn`` with its keywords validated first (unknown ones: a one-line TrustVisionError)."""
    params = list(inspect.signature(fn).parameters)
    if params[1:3] != list(_CORE) or not set(_SHARED) <= set(params):
        raise TypeError(f"{cls.__qualname__}.attribute must be attribute(self, inputs, target=None, *, "
                        "seed=0, internal_batch_size=None, **method_kw) (the Explainer contract)")

    @functools.wraps(fn)
    def attribute(self, inputs, target=None, **kw):
        check_keywords(type(self), kw)
        return fn(self, inputs, target, **kw)

    return attribute


# -- the registry ----------------------------------------------------------------------------


_METHODS: Registry["type[Explainer]"] = Registry("explanation method", "`trustvision.explain.list_methods()`")


def _register(cls: type[Explainer]) -> None:
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no name; set the class attribute name = '...'")
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__qualname__}.kind must be one of {', '.join(KINDS)}, got {cls.kind!r}")
    unknown = [r for r in cls.requires if r not in REQUIREMENTS]
    if unknown:
        raise TypeError(f"{cls.__qualname__} requires unknown {unknown[0]!r}; known: {', '.join(REQUIREMENTS)}")
    if not cls.title:
        cls.title = cls.name
    if cls.name in _METHODS:
        old = _METHODS.get(cls.name)
        if (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__):
            _METHODS.remove(cls.name)  # the same class again (its module was re-imported)
    _METHODS.add(cls.name, cls)


def register_method(name: str | None = None) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator registering an :class:`Explainer` subclass under ``name`` (default: its
    ``name`` attribute). Subclasses that set ``name`` are registered without it."""

    def deco(cls: type[Explainer]) -> type[Explainer]:
        if not (isinstance(cls, type) and issubclass(cls, Explainer)):
            raise TypeError("@register_method decorates subclasses of trustvision.explain.Explainer")
        key = name or cls.name
        if cls.name and cls.name != key and _METHODS.lookup(cls.name) is cls:
            _METHODS.remove(cls.name)
        cls.name = key
        if _METHODS.lookup(key) is not cls:
            _register(cls)
        return cls

    return deco


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive sessions); unknown: no-op."""
    _METHODS.remove(name)


def get(name: str) -> type[Explainer]:
    """The method class registered under ``name`` (unknown names raise a one-line error)."""
    return _METHODS.get(name)


def list_methods(kind: str | None = "heatmap") -> list[str]:
    """Sorted names of the registered methods of ``kind`` (default ``"heatmap"``: the methods
    returning heatmaps, as before SAG was registered); ``kind=None`` lists every method."""
    if kind is not None and kind not in KINDS:
        raise TrustVisionError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)} or None")
    return [n for n in _METHODS.names() if kind is None or _METHODS.get(n).kind == kind]


def method_info(name: str) -> dict[str, Any]:
    """What method ``name`` declares: name, title, kind, requires, in_audit, order, keywords
    (keyword -> default) and the first line of its docstring."""
    cls = get(name)
    doc = inspect.getdoc(cls) or ""
    return {"name": cls.name, "title": cls.title, "kind": cls.kind, "requires": tuple(cls.requires),
            "in_audit": bool(cls.in_audit), "order": cls.order, "keywords": cls.defaults(),
            "doc": doc.split("\n\n")[0].replace("\n", " ")}
