"""LoRA: low-rank adapters on our Linear layers, interchangeable with PEFT's files.

`apply_lora` swaps chosen `Linear` modules for `LoRALinear` (frozen base weight plus trainable `lora_A`
`[r, in]` and `lora_B` `[out, r]`), chosen by Hugging Face / PEFT module names (`query`, `value`, `c_attn`, ...)
so one adapter config works in both worlds. `save_adapter` / `load_adapter` write and read PEFT's
`adapter_model.safetensors` + `adapter_config.json`; `merge_lora` / `unmerge_lora` fold the update into the
base weight and back.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from scratchformer.durable import write_file, write_text

from .backend import check_backend, uses_triton
from .checkpoint import CheckpointError, family_of, module_table

logger = logging.getLogger("scratchformer")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
TASK_TYPES = {"SequenceClassifier": "SEQ_CLS", "TokenClassifier": "TOKEN_CLS", "CausalLM": "CAUSAL_LM",
              "Encoder": "FEATURE_EXTRACTION"}

# Every field of `peft.LoraConfig().to_dict()` that LoRAConfig has no attribute for, with its default, read from
# PEFT 0.21.2 (the version in peft_version): adapter_config.json carries PEFT's whole field set, as PEFT writes
# it. The package never imports peft; tests/engine/test_lora.py checks this table against the installed peft.
PEFT_VERSION = "0.21.2"
PEFT_LORA_DEFAULTS = {
    "peft_type": "LORA", "peft_version": PEFT_VERSION, "auto_mapping": None, "revision": None,
    "inference_mode": True,  # PEFT saves every adapter with inference_mode true
    "bias": "none", "init_lora_weights": True, "exclude_modules": None, "layers_to_transform": None,
    "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": None,
    "megatron_core": "megatron.core", "trainable_token_indices": None, "loftq_config": {}, "eva_config": None,
    "corda_config": None, "lora_ga_config": None, "use_dora": False, "velora_config": None,
    "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16, "monteclora_config": None,
    "layer_replication": None, "lora_bias": False, "target_parameters": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
}
# PEFT features that change what an adapter computes and that we do not implement: a file using one is refused
# rather than loaded wrong. Each is off when the field is missing, null, false or empty.
UNSUPPORTED_FEATURES = {
    "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas", "use_dora": "DoRA",
    "exclude_modules": "excluding modules", "layers_to_transform": "LoRA on chosen layers only",
    "layer_replication": "layer replication", "lora_bias": "a bias on lora_B", "use_qalora": "QALoRA",
    "target_parameters": "LoRA on parameters", "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA", "arrow_config": "Arrow routing",
}


@dataclass
class LoRAConfig:
    """The LoRA settings, with PEFT's names where PEFT has one."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self) -> dict:
        """adapter_config.json's content: PEFT's defaults, then the fields a PEFT file had (`extra`), then ours."""
        ours = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**copy.deepcopy(PEFT_LORA_DEFAULTS), **copy.deepcopy(self.extra), **ours}


class LoRALinear(nn.Module):
    """`y = x W^T + b + scaling * (dropout(x) A^T) B^T`. x `[..., in]` -> `[..., out]`.

    `weight` `[out, in]` and `bias` are the base layer's, frozen; `lora_A` `[r, in]` (kaiming-uniform, as PEFT)
    and `lora_B` `[out, r]` (zeros, so a fresh adapter changes nothing) are trained. Where the backend
    (engine/backend.py) runs Triton, the fused `lora_linear` kernel computes it in one pass over the output;
    elsewhere the same maths runs in PyTorch.
    """

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout_p: float = 0.0, backend: str = "auto"):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default, as PEFT initialises A
        self.r, self.scaling, self.dropout_p, self.backend = r, scaling, dropout_p, check_backend(backend)
        self.merged = False
        self.train(base.training)  # an eval-mode model stays in eval mode: no dropout sneaks in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        p = self.dropout_p if self.training else 0.0
        if uses_triton(self.backend, x):
            from scratchformer.kernels import lora_linear

            return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, dropout_p=p)
        dropped = F.dropout(x, p, training=True) if p > 0.0 else x
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, `[out, in]`, computed in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


# ---- module names ----------------------------------------------------------------------------------------


def hf_module_paths(model) -> dict[str, str]:
    """Our module path -> the module's path in the equivalent HF model (as PEFT names it), for Linear layers."""
    prefix = family_of(model).body_prefix if model.body_prefix_in_file else ""
    return {ours: (prefix if in_body else "") + theirs
            for ours, (theirs, kind, in_body) in module_table(model).items() if kind in ("linear", "conv1d")}


def hf_head_paths(model) -> dict[str, str]:
    """Our head module path -> HF path, for `modules_to_save` (classifier, score, ...)."""
    prefix = family_of(model).body_prefix if model.body_prefix_in_file else ""
    return {ours: (prefix if in_body else "") + theirs for ours, (theirs, kind, in_body) in module_table(model).items()}


def _matches(hf_path: str, targets) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches a name equal to or ending in `.target`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, hf_path) is not None
    return any(hf_path == t or hf_path.endswith("." + t) for t in targets)


def _get(model, path):
    return model.get_submodule(path)


def _set(model, path, module):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def lora_modules(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# ---- apply / merge ---------------------------------------------------------------------------------------


def apply_lora(model, r: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules=None,
               use_rslora: bool = False, modules_to_save=None, backend: str | None = None, verbose: bool = False):
    """Add LoRA adapters to `model` in place and freeze everything else; returns the model.

    target_modules: HF / PEFT module names (list: suffix match; str: regex full match); default as PEFT (BERT
    `query` + `value`, GPT-2 `c_attn`; engine/families/). modules_to_save: HF names of modules trained in full
    (e.g. `classifier`). backend: "auto" | "eager" | "sdpa" | "triton" (engine/backend.py); None: the model's.
    verbose: print the trainable / total parameter counts (PEFT's print_trainable_parameters line), else log
    them at INFO. `count_parameters(model)` returns them as numbers.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters: load_adapter replaces them with a saved adapter; "
                         "for new ones start from a fresh model")
    family = family_of(model)
    targets = list(family.lora_targets) if target_modules is None else target_modules
    backend = check_backend(backend if backend is not None else model.config.backend)
    chosen = _target_paths(model, targets)
    if not chosen:
        names = sorted({theirs.rsplit(".", 1)[-1] for theirs in hf_module_paths(model).values()})
        raise ValueError(f"target_modules {targets!r} match no module; Linear modules here: {names}")
    config = LoRAConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets if isinstance(targets, str) else sorted(set(targets)),
                        use_rslora=use_rslora, modules_to_save=list(modules_to_save) if modules_to_save else None,
                        fan_in_fan_out=family.fan_in_fan_out, task_type=TASK_TYPES.get(model.model_class_name()),
                        base_model_name_or_path=getattr(model, "name_or_path", None))
    for p in model.parameters():
        p.requires_grad_(False)
    for ours in chosen:
        _set(model, ours, LoRALinear(_get(model, ours), r, config.scaling, dropout, backend))
    for ours in _modules_to_save(model, config.modules_to_save or []):
        for p in _get(model, ours).parameters():
            p.requires_grad_(True)
    model.lora_config = config
    summary = f"LoRA r={r} on {len(chosen)} modules: {_trainable_parameters_line(model)}"
    if verbose:
        print(summary, flush=True)
    else:
        logger.info(summary)
    return model


def _target_paths(model, targets) -> dict[str, str]:
    """Our path -> HF path of every Linear module that `targets` selects (PEFT's matching rule)."""
    return {ours: theirs for ours, theirs in hf_module_paths(model).items() if _matches(theirs, targets)}


def _remove_lora(model) -> None:
    """Put plain `Linear` layers back in place of the (unmerged) LoRA modules, sharing their weight and bias."""
    for path, m in lora_modules(model).items():
        if m.merged:
            raise RuntimeError(f"{path}: unmerge the adapter before removing it")
        with torch.device("meta"):
            base = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        base.weight, base.bias = m.weight, m.bias
        base.train(m.training)  # a fresh module is in training mode; LoRA applied on it again inherits this
        _set(model, path, base)


def _modules_to_save(model, names) -> dict[str, str]:
    """Our module path -> HF path of the head modules PEFT's `modules_to_save` names select.

    PEFT's rule: a module is selected when its HF path ends with the name, as a plain string (so `classifier`
    also selects DistilBERT's `pre_classifier`). The module may be a container of mapped layers (RoBERTa's
    `classifier` holds `dense` and `out_proj`); the outermost match is the one trained in full. A name this
    head does not have is skipped (PEFT lists both `classifier` and `score` for any sequence classifier).
    """
    out = {}
    for ours, theirs in hf_head_paths(model).items():
        parts = theirs.split(".")
        for end in range(1, len(parts) + 1):  # the module itself and each module it sits in, outermost first
            inside = "".join("." + part for part in parts[end:])  # the layer's path below that module
            if any(".".join(parts[:end]).endswith(name) for name in names) and ours.endswith(inside):
                out[ours[:len(ours) - len(inside)]] = theirs[:len(theirs) - len(inside)]
                break
    return out


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _trainable_parameters_line(model) -> str:
    """PEFT's print_trainable_parameters line: `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7300`."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def print_trainable_parameters(model) -> None:
    """Print the trainable / total parameter counts, as PEFT's `PeftModel.print_trainable_parameters()` does."""
    print(_trainable_parameters_line(model), flush=True)


def merge_lora(model):
    """Fold every adapter into its base weight (outputs unchanged, LoRA costs nothing at inference)."""
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model):
    """Undo `merge_lora`: subtract the same update again."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model


# ---- PEFT files ------------------------------------------------------------------------------------------


def save_adapter(model, path: str | os.PathLike) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` exactly as PEFT does, each atomically."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save (call apply_lora or load_adapter first)")
    paths = hf_module_paths(model)
    tensors = {}
    for ours, m in modules.items():
        key = PEFT_PREFIX + paths[ours]
        tensors[f"{key}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    for ours, theirs in _modules_to_save(model, model.lora_config.modules_to_save or []).items():
        for pname, p in _get(model, ours).named_parameters():
            tensors[f"{PEFT_PREFIX}{theirs}.{pname}"] = p.detach().contiguous().cpu()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_file(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = model.lora_config.to_peft_dict()
    # As PEFT: an adapter that does not know its base yet records the folder the model was loaded from.
    config["base_model_name_or_path"] = config["base_model_name_or_path"] or getattr(model, "name_or_path", None)
    write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def read_adapter_config(folder: Path) -> LoRAConfig:
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: invalid JSON ({err})") from None
    if d.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type {d['peft_type']!r} is not LORA")
    for key, feature in UNSUPPORTED_FEATURES.items():
        if d.get(key):
            raise CheckpointError(f"{file}: {key}={d[key]!r}: {feature} is not supported")
    if d.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: bias={d['bias']!r}: adapters that train biases are not supported")
    names = {f for f in LoRAConfig.__dataclass_fields__ if f != "extra"}
    known = {k: d[k] for k in names if k in d}
    known["modules_to_save"] = sorted(set(known["modules_to_save"])) if known.get("modules_to_save") else None
    return LoRAConfig(**known, extra={k: v for k, v in d.items() if k not in names})


def load_adapter(model, path: str | os.PathLike, backend: str | None = None):
    """Load a PEFT LoRA adapter folder into `model`; afterwards the model computes that adapter and no other.

    Loading replaces whatever adapter the model has:
    - the adapted modules, the rank and `modules_to_save` are the file's. When the model already has exactly
      those (resuming a run, or swapping in an adapter of the same shape) its LoRA parameters are overwritten in
      place, so an optimizer holding them stays valid. Otherwise the old adapter is removed and LoRA applied
      afresh from the file's config, as on a model that never had one (everything else frozen; weights the file
      does not hold, such as a head it does not save, keep their current values).
    - alpha, rsLoRA and dropout are the file's: every module's `scaling` and `dropout_p` follow them.
    - a merged model is unmerged first (the old update leaves the base weights) and merged again with the new
      adapter, so it stays merged and a later `unmerge_lora` restores the base weights.
    backend: "auto" | "eager" | "sdpa" | "triton" for the LoRA modules; None keeps the adapter's, else the model's.

    Everything is checked before anything changes: an adapter whose tensors do not fit the model raises
    CheckpointError naming the module and both shapes, and leaves the model as it was.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such adapter folder")
    config = read_adapter_config(folder)
    targets = _target_paths(model, _targets_of(model, config))
    copies = _checked_adapter_tensors(model, config, targets, folder)

    modules = lora_modules(model)
    was_merged = any(m.merged for m in modules.values())
    unmerge_lora(model)
    backend = check_backend(backend or next((m.backend for m in modules.values()), model.config.backend))
    old = getattr(model, "lora_config", None)
    saved_before = _modules_to_save(model, old.modules_to_save or []) if old is not None else []
    same_shape = (set(modules) == set(targets) and all(m.r == config.r for m in modules.values())
                  and set(saved_before) == set(_modules_to_save(model, config.modules_to_save or [])))
    if same_shape:
        for m in modules.values():
            m.scaling, m.dropout_p, m.backend = config.scaling, config.lora_dropout, backend
    else:
        _remove_lora(model)
        apply_lora(model, r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   target_modules=_targets_of(model, config), use_rslora=config.use_rslora,
                   modules_to_save=config.modules_to_save, backend=backend)
    model.lora_config = config
    with torch.no_grad():
        for ours, pname, tensor in copies:
            getattr(_get(model, ours), pname).copy_(tensor)
    if was_merged:
        merge_lora(model)
    return model


def _targets_of(model, config: LoRAConfig):
    return list(family_of(model).lora_targets) if config.target_modules is None else config.target_modules


def _checked_adapter_tensors(model, config: LoRAConfig, targets: dict[str, str], folder: Path):
    """The adapter file's tensors as (our module path, parameter name, tensor), each checked against the model.

    `lora_A` `[r, in]` and `lora_B` `[out, r]` (r from the file's config) for every module in `targets`, and the
    full parameters of the modules the file saves whole (modules_to_save). Raises CheckpointError naming the
    module and the shapes for anything missing, extra or of the wrong shape.
    """
    file = folder / ADAPTER_WEIGHTS
    try:
        with safe_open(file, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
    prefix = family_of(model).body_prefix

    def normalise(key):  # PEFT keys name the HF module; accept files made on a model with or without the body prefix
        return key.removeprefix(PEFT_PREFIX).replace(".default.", ".").removeprefix(prefix)

    by_hf = {normalise(k): v for k, v in state.items()}
    if not targets:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: target_modules {config.target_modules!r} match no module "
                              "of this model")
    copies, used = [], set()
    for ours, theirs in targets.items():
        module, theirs = _get(model, ours), theirs.removeprefix(prefix)
        for part, shape in (("lora_A", [config.r, module.in_features]), ("lora_B", [module.out_features, config.r])):
            key = f"{theirs}.{part}.weight"
            if key not in by_hf:
                raise CheckpointError(f"{file}: no {part} for module {theirs!r}")
            if list(by_hf[key].shape) != shape:
                raise CheckpointError(f"{file}: module {theirs!r} {part} has shape {list(by_hf[key].shape)}, the model "
                                      f"expects {shape} (r={config.r} from {ADAPTER_CONFIG})")
            copies.append((ours, part, by_hf[key]))
            used.add(key)
    linear = {v.removeprefix(prefix) for v in hf_module_paths(model).values()}
    heads = {v.removeprefix(prefix): k for k, v in hf_head_paths(model).items()}
    for key, tensor in by_hf.items():
        if key in used:
            continue
        if ".lora_" in key:
            module_hf = key.split(".lora_")[0]
            why = (f"target_modules {config.target_modules!r} do not select module {module_hf!r}" if module_hf in linear
                   else f"module {module_hf!r} is not in this model")
            raise CheckpointError(f"{file}: key {key!r}: {why}")
        module_hf, _, pname = key.rpartition(".")
        module_hf = module_hf.removesuffix(".modules_to_save")
        params = dict(_get(model, heads[module_hf]).named_parameters(recurse=False)) if module_hf in heads else {}
        if pname not in params:
            raise CheckpointError(f"{file}: key {key!r} matches no parameter of this model")
        if tensor.shape != params[pname].shape:
            raise CheckpointError(f"{file}: module {module_hf!r} {pname} has shape {list(tensor.shape)}, "
                                  f"the model expects {list(params[pname].shape)}")
        copies.append((heads[module_hf], pname, tensor))
    return copies
