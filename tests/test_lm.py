"""Loading, tokenisation helpers and clear errors on bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import kncore
from kncore import InputError
from kncore.testing import tiny_lm


def test_unsupported_architecture_names_supported():
    import transformers as tf
    m = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                                       vocab_size=50, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="unsupported architecture 'opt'") as err:
        kncore.from_hf(m, None)
    from kncore.models import ADAPTERS
    assert all(repr(mt)[1:-1] in str(err.value) for mt in ADAPTERS)  # every supported model_type
    assert "T5" in str(err.value)  # and what is not yet supported


def test_unsupported_folder_names_supported(tmp_path):
    import transformers as tf
    tf.OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                 vocab_size=50, word_embed_proj_dim=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'opt'.*gemma2.*gpt_neox.*qwen3"):
        kncore.load(str(tmp_path))


def test_bidirectional_gemma_is_refused():
    import transformers as tf
    cfg = tf.Gemma3TextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=8, vocab_size=50, use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="bidirectional attention"):
        kncore.from_hf(tf.Gemma3ForCausalLM(cfg), None)


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_local_folder_loads_through_load(arch, tmp_path):
    """A saved Hugging Face folder of each new family loads through kncore.load
    (AutoModel, AutoTokenizer, the adapter) with the same logits."""
    lm = tiny_lm(arch, seed=int(torch.randint(0, 1000, ())))
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    got = kncore.load(str(tmp_path))
    assert type(got.adapter) is type(lm.adapter) and got.n_layers == lm.n_layers
    ids = torch.tensor([got.tokenize("the capital of canada is ottawa and the capital of france is")])
    with torch.no_grad():
        assert torch.equal(got.run(ids).logits, lm.run(ids).logits)


def test_load_missing_path():
    with pytest.raises(ValueError, match="cannot load a model config"):
        kncore.load("/nonexistent/model/dir")


def test_empty_and_too_long_prompt(arch):
    lm = tiny_lm(arch)
    with pytest.raises(InputError, match="empty prompt"):
        lm.tokenize("   ")
    long = " ".join(["the"] * 200) + (" [MASK]" if lm.is_mlm else "")
    with pytest.raises(InputError, match="longer than the model's context"):
        lm.tokenize(long)


def test_missing_mask_for_bert():
    lm = tiny_lm("bert")
    with pytest.raises(InputError, match="exactly one \\[MASK\\]"):
        lm.tokenize("the capital of canada is ottawa")
    ids = lm.tokenize("the capital of canada is [MASK] .")
    assert lm.target_position(ids) == ids.index(lm.tokenizer.mask_token_id)


def test_subject_span_and_errors(arch):
    lm = tiny_lm(arch)
    p = "the capital of canada is" + (" [MASK]" if lm.is_mlm else "")
    s, e = lm.subject_span(p, "canada")
    ids = lm.tokenize(p)
    assert lm.tokenizer.decode(ids[s:e]).strip() == "canada"
    with pytest.raises(InputError, match="not in the prompt"):
        lm.subject_span(p, "france")


def test_target_errors(arch):
    lm = tiny_lm(arch)
    p = "the capital of canada is" + (" [MASK]" if lm.is_mlm else "")
    with pytest.raises(InputError, match="empty target"):
        lm.target_ids(p, " ")
    with pytest.raises(InputError, match="must be one token"):
        lm.single_token(p, "ottawa paris")
    with pytest.raises(InputError, match="not a single token"):
        lm.token_id("ottawa paris")


def test_batch_padding_and_probs(arch):
    lm = tiny_lm(arch)
    m = " [MASK]" if lm.is_mlm else ""
    prompts = ["the capital of canada is" + m, "the dog" + m]
    b = lm.batch(prompts)
    assert b.input_ids.shape[0] == 2 and b.lengths.tolist() == [len(lm.tokenize(p)) for p in prompts]
    p = lm.next_token_probs(prompts)
    for i, pr in enumerate(prompts):
        assert torch.allclose(p[i], lm.next_token_probs(pr)[0], atol=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(2), atol=1e-5)


# ---- the embedded SmolLM2 -------------------------------------------------

@pytest.mark.slow
def test_smollm_matches_hf_and_knows_ottawa(smollm):
    b = smollm.batch(["The capital of Canada is", "The capital of France is"])
    with torch.no_grad():
        ref = smollm.model(b.input_ids, attention_mask=b.attention_mask.long()).logits
        out = smollm.run(b.input_ids, attention_mask=b.attention_mask).logits
    assert (ref - out).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert smollm.top_k("The capital of Canada is", 1)[0][0] == " Ottawa"
    assert smollm.arch == "llama" and smollm.n_layers == 30


@pytest.mark.slow
def test_smollm_cache_detects_corruption(smollm, tmp_path):
    from kncore import loading
    src = loading.cache_root() / "smollm2-135m"
    gguf = loading.embedded_gguf("smollm2-135m")
    source = {"file": gguf.name, "size": gguf.stat().st_size}
    assert loading.cache_ok(src, source)
    copy = tmp_path / "c"
    shutil.copytree(src, copy)
    assert loading.cache_ok(copy, source)
    meta = json.loads((copy / "kncore-cache.json").read_text())
    assert meta["source"] == source
    with open(copy / "model.safetensors", "r+b") as f:  # flip one byte deep in the weights
        f.seek(10_000_000)
        b = f.read(1)
        f.seek(10_000_000)
        f.write(bytes([b[0] ^ 0xFF]))
    assert not loading.cache_ok(copy, source)
    (copy / "kncore-cache.json").unlink()  # a partial cache (no manifest) is refused too
    assert not loading.cache_ok(copy, source)
    assert not loading.cache_ok(src, {"file": gguf.name, "size": 1})  # another source
