"""ROME hyper-parameters: our YAML files, ROME's JSON and EasyEdit's YAML.

Field names are ROME's (``kmeng01/rome``, ``hparams/ROME/*.json``) and
EasyEdit's (``hparams/ROME/*.yaml``), so their files load unchanged.
Fields that only say *where* things live in a Hugging Face model
(``rewrite_module_tmp``, ``layer_module_tmp``, ``mlp_module_tmp``,
``attn_module_tmp``, ``ln_f_module``, ``lm_head_module``) are not needed:
kncore's architecture adapter knows the down-projection, the MLP output and
the head of every supported model. They are kept in :attr:`ROMEHparams.ignored`
and a mismatch with the model (say a GPT-2 file used on LLaMA) is reported
when the file names a module the model does not have. Run-time fields of
EasyEdit (``device``, ``model_name``, ``stats_dir``, ``alg_name``,
``model_parallel``, ``fp16``, ``max_length``, ...) are ignored with a note.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..lm import InputError

log = logging.getLogger("kncore")

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"

# Fields of ROME / EasyEdit files that kncore does not need, and why.
_IGNORED = {
    "rewrite_module_tmp": "the adapter's down_module(L) is edited",
    "layer_module_tmp": "the runtime's layer loop is used",
    "mlp_module_tmp": "the delta is added at the runtime site ('mlp_out', L)",
    "attn_module_tmp": "not used by ROME",
    "ln_f_module": "the adapter's final norm is used",
    "lm_head_module": "the adapter's head is used",
    "alg_name": "checked against the hparams class (ROME, MEMIT, EMMET)",
    "model_name": "the LM passed to edit() is used",
    "stats_dir": "pass cache_dir= to layer_stats (default $KNCORE_CACHE/rome_stats)",
    "device": "the model's device is used",
    "model_parallel": "not supported; one device",
    "fp16": "the model's dtype is used",
    "max_length": "EasyEdit's generation length; not used",
    "batch_size": "EasyEdit's evaluation batch; not used",
    "enable_prompt_keys": "EasyEdit variant; not implemented",
    "original_implementation": "kncore always computes k* over the context templates as ROME does",
}


@dataclass
class ROMEHparams:
    """ROME's hyper-parameters (defaults: ROME's GPT-2 XL file, layer aside).

    ``layers``: the layer(s) edited (ROME edits one: its causal-trace peak).
    ``fact_token``: ``"subject_last"`` (ROME), ``"subject_first"`` or ``"last"``.
    ``v_num_grad_steps``, ``v_lr``: Adam on the MLP-output delta.
    ``v_loss_layer``: kept for compatibility; the loss is read from the model's
    own logits, as ROME's final code does (its ``v_loss_layer`` is the last layer).
    ``v_weight_decay``: ``v_weight_decay * ||delta|| / ||v_init||^2`` in the loss.
    ``clamp_norm_factor``: ``||delta|| <= clamp_norm_factor * ||v_init||``.
    ``kl_factor``: weight of KL(new || old) on ``kl_prompts`` at the subject.
    ``mom2_adjustment``: u = C^-1 k* (ROME) rather than k* (EasyEdit's default).
    ``mom2_dataset``, ``mom2_n_samples``, ``mom2_dtype``: the statistics C.
    ``mom2_reg``: adds ``mom2_reg * mean(diag C)`` to the diagonal before the
    solve (0: none, as ROME). Use it when C is ill-conditioned.
    ``context_template_length_params``: ``[[length, count], ...]`` prefixes the
    model generates itself (ROME: ``[[5, 10], [10, 10]]``, 20 prefixes).
    ``context_prompts``, ``context_top_k``, ``context_seed``: how they are
    sampled (ROME's prompts and top-k; the seed is kncore's, ROME's is random).
    ``early_stop_loss``: stop the optimisation below this loss (ROME: 5e-2).
    ``enable_random_prefix_keys``: EasyEdit's r-ROME variant: the update's
    key and old value are averaged over the context templates (default off: ROME).
    """

    METHOD: ClassVar[str] = "ROME"
    # alg_name values of ROME/EasyEdit files this class reads (EasyEdit's r-ROME is "R-ROME").
    ALG_NAMES: ClassVar[tuple] = ("ROME", "R-ROME")
    # Shipped files of this method: HPARAMS_DIR / SUBDIR / <name>.yaml
    SUBDIR: ClassVar[str] = ""

    layers: list = field(default_factory=lambda: [17])
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    mom2_reg: float = 0.0
    context_template_length_params: list = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_prompts: list = field(default_factory=lambda: ["The", "Therefore", "Because", "I", "You"])
    context_top_k: int = 5
    context_seed: int = 0
    kl_prompts: list = field(default_factory=lambda: ["{} is a"])
    early_stop_loss: float = 5e-2
    enable_random_prefix_keys: bool = False
    ignored: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "ROMEHparams":
        """Raise :class:`InputError` naming the first bad field."""
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        self.layers = [int(L) for L in self.layers]
        if not self.layers:
            raise InputError("hparams.layers is empty: name the layer to edit")
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"hparams.layers has duplicates: {self.layers}")
        if self.fact_token not in ("subject_last", "subject_first", "last"):
            raise InputError(f"hparams.fact_token {self.fact_token!r} not recognised; "
                             "use 'subject_last', 'subject_first' or 'last'")
        if int(self.v_num_grad_steps) < 1:
            raise InputError("hparams.v_num_grad_steps must be >= 1")
        for name in ("v_lr", "clamp_norm_factor"):
            if not float(getattr(self, name)) > 0:
                raise InputError(f"hparams.{name} must be > 0, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "mom2_reg", "early_stop_loss"):
            if float(getattr(self, name)) < 0:
                raise InputError(f"hparams.{name} must be >= 0, got {getattr(self, name)}")
        if self.mom2_dtype not in ("float32", "float64"):
            raise InputError(f"hparams.mom2_dtype must be 'float32' or 'float64', got {self.mom2_dtype!r}")
        try:
            self.context_template_length_params = [[int(a), int(b)] for a, b in
                                                   self.context_template_length_params]
        except (TypeError, ValueError):
            raise InputError("hparams.context_template_length_params must be [[length, count], ...], "
                             f"got {self.context_template_length_params!r}") from None
        for length, count in self.context_template_length_params:
            if length < 1 or count < 0:
                raise InputError(f"bad context template length/count {[length, count]}")
        if not self.context_prompts:
            raise InputError("hparams.context_prompts is empty")
        for p in self.kl_prompts:
            if p.count("{}") != 1:
                raise InputError(f"KL prompt {p!r} must hold exactly one '{{}}' for the subject")
        return self

    def replace(self, **kw) -> "ROMEHparams":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("ignored")
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "dict") -> "ROMEHparams":
        """Build from ROME/EasyEdit/kncore field names (see the module doc)."""
        if not isinstance(d, dict):
            raise InputError(f"{source}: expected a mapping of hyper-parameters, got {type(d).__name__}")
        alg = d.get("alg_name")
        if alg is not None and str(alg).upper() not in cls.ALG_NAMES:
            raise InputError(f"{source}: these are {alg} hyper-parameters (alg_name), not {cls.METHOD}'s: "
                             f"load them with the {alg} editor's hparams class")
        known = {f.name for f in dataclasses.fields(cls)} - {"ignored"}
        kw, ignored, unknown = {}, {}, []
        for k, v in d.items():
            if k in known:
                kw[k] = v
            elif k in _IGNORED:
                ignored[k] = v
            else:
                unknown.append(k)
        if unknown:
            warnings.warn(f"{source}: unknown {cls.METHOD} hyper-parameters ignored: {sorted(unknown)}", stacklevel=3)
            for k in unknown:
                ignored[k] = d[k]
        if ignored:
            log.info("%s: fields not needed by kncore: %s", source,
                     ", ".join(f"{k} ({_IGNORED.get(k, 'unknown')})" for k in ignored))
        # YAML reads 5e-1 as a string: every float field is converted.
        floats = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, float)}
        for k in floats & set(kw):
            try:
                kw[k] = float(kw[k])
            except (TypeError, ValueError):
                raise InputError(f"{source}: hparams.{k} must be a number, got {kw[k]!r}") from None
        hp = cls(**kw)
        hp.ignored = ignored
        return hp

    def check_model(self, lm) -> None:
        """Refuse layers outside the model, and a file written for another layout."""
        for L in self.layers:
            if not 0 <= L < lm.n_layers:
                raise InputError(f"hparams.layers {self.layers}: layer {L} is outside the model's "
                                 f"{lm.n_layers} layers")
        tmpl = self.ignored.get("rewrite_module_tmp")
        if tmpl:
            names = {n for n, _ in lm.model.named_modules()}
            name = tmpl.format(self.layers[0])
            if name not in names:
                raise InputError(f"these hparams were written for another architecture: "
                                 f"rewrite_module_tmp names {name!r}, which {lm.name} does not have "
                                 f"(its down-projection is {_module_name(lm, self.layers[0])!r})")


def _module_name(lm, L):
    target = lm.adapter.down_module(L)
    for n, m in lm.model.named_modules():
        if m is target:
            return n
    return "?"


def available(cls=ROMEHparams) -> list[str]:
    """Names of the hparams files of ``cls``'s method that ship with kncore."""
    return sorted(p.stem for p in (HPARAMS_DIR / cls.SUBDIR).glob("*.yaml"))


def _yaml_error(p: Path, e) -> None:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(e, "problem", None) or " ".join(str(e).split())
    raise InputError(f"hparams {p}{where}: not valid YAML: {what}") from None


def load_hparams(name_or_path, cls=ROMEHparams) -> ROMEHparams:
    """Load hparams by shipped name (``"gpt2-xl"``) or a ``.yaml``/``.json`` path
    (kncore's, ROME's or EasyEdit's; ``cls`` picks the method: ROMEHparams,
    MEMITHparams, EMMETHparams). A file of another method (its ``alg_name``)
    is refused."""
    if isinstance(name_or_path, ROMEHparams) and name_or_path.METHOD == cls.METHOD:
        return name_or_path
    if isinstance(name_or_path, ROMEHparams):
        raise InputError(f"{type(name_or_path).__name__} given where {cls.__name__} ({cls.METHOD}) is needed")
    if isinstance(name_or_path, dict):
        return cls.from_dict(name_or_path)
    p = Path(name_or_path)
    if not p.exists():
        cand = HPARAMS_DIR / cls.SUBDIR / f"{name_or_path}.yaml"
        if not cand.exists():
            raise InputError(f"no {cls.METHOD} hparams {str(name_or_path)!r}: not a file, and not one of "
                             f"the shipped {available(cls)}")
        p = cand
    text = p.read_text()
    if p.suffix == ".json":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise InputError(f"{cls.METHOD} hparams {p}: not valid JSON: {e}") from None
    else:
        import yaml
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:  # a multi-line message: one line naming the file and the line
            _yaml_error(p, e)
    if not isinstance(d, dict):
        raise InputError(f"{cls.METHOD} hparams {p}: expected a mapping of hyper-parameters, got {type(d).__name__}")
    return cls.from_dict(d, source=str(p))


# Model names (lower case, as LM.name or a hub id ends) -> shipped hparams file.
_BY_MODEL = {
    "gpt2-xl": "gpt2-xl",
    "gpt-j-6b": "gpt-j-6b",
    "llama-2-7b": "llama-2-7b",
    "llama-2-7b-hf": "llama-2-7b",
    "smollm2-135m": "smollm2-135m",
    "gpt-neox-20b": "gpt-neox-20b",
    "qwen2.5-7b": "qwen2.5-7b",
    "pythia-6.9b": "pythia-6.9b",
    "gemma-2-9b": "gemma-2-9b",
    "gemma-2-9b-it": "gemma-2-9b",  # the source file was written for the -it checkpoint
}


def hparams_for(lm, cls=ROMEHparams) -> ROMEHparams:
    """The shipped hparams of a model, found by its name."""
    key = str(lm.name).rstrip("/").split("/")[-1].lower()
    if key not in _BY_MODEL or _BY_MODEL[key] not in available(cls):
        raise InputError(f"no shipped {cls.METHOD} hparams for model {lm.name!r} (shipped: {available(cls)}); "
                         f"pass hparams={cls.__name__}(layers=[L], ...) or a YAML/JSON file")
    return load_hparams(_BY_MODEL[key], cls)
