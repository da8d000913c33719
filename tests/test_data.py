"""Data loaders on the real files, malformed records, and BLiMP prompts."""
from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

import kncore
import kncore.data as D
from kncore.data import DataError
from kncore.testing import tiny_lm


# -- loaders on the real files -------------------------------------------------------
def test_blimp_all_paradigms(data_dir):
    names = D.blimp_paradigms(data_dir)
    assert len(names) == 67
    for name in names:
        pairs = D.load_blimp(name, data_dir)
        assert len(pairs) == 1000, name
        p = pairs[int(random.random() * 1000)]
        assert p.paradigm == name and isinstance(p.pair_id, str)
        assert isinstance(p.sentence_good, str) and isinstance(p.sentence_bad, str)
        assert all(isinstance(x, bool) for x in (p.one_prefix, p.two_prefix, p.simple_lm, p.lexically_identical))
        for q in pairs:
            if q.one_prefix:
                assert q.sentence_good.startswith(q.prefix + " " + q.word_good)
                assert q.sentence_bad.startswith(q.prefix + " " + q.word_bad)
            if q.two_prefix:
                assert q.sentence_good.startswith(q.prefix_good) and q.sentence_bad.startswith(q.prefix_bad)
                assert q.shared_word.strip() in q.sentence_good[len(q.prefix_good):]


def test_blimp_classes(data_dir):
    want = {"determiner_noun_agreement_2": {"singular", "plural"},
            "anaphor_gender_agreement": {"female", "male", "neuter"},
            "regular_plural_subject_verb_agreement_1": {"singular", "plural"},
            "adjunct_island": {"all"}}
    for name, classes in want.items():
        pairs = D.load_blimp(name, data_dir)
        assert {p.cls for p in pairs} == classes, name
    for p in D.load_blimp("determiner_noun_agreement_2", data_dir):
        det = p.prefix_good.split()[-1].lower()
        assert p.cls == ("singular" if det in ("this", "that") else "plural")
    for p in D.load_blimp("anaphor_gender_agreement", data_dir):
        assert p.cls == {"herself": "female", "himself": "male", "itself": "neuter"}[p.word_good]


def test_pararel(data_dir):
    rels = D.pararel_relations(data_dir)
    assert len(rels) == 39 and "P36" in rels and "P31" not in rels  # P31 and P527 have no patterns
    n_pat = sum(len(D.load_pararel_patterns(r, data_dir)) for r in rels)
    assert n_pat == 329
    fact_files = sorted((data_dir / "pararel" / "facts").glob("*.jsonl"))
    assert len(fact_files) == 41
    assert sum(len(D.load_pararel_facts(f.stem, data_dir)) for f in fact_files) == 29411
    f = D.load_pararel_facts("P36", data_dir)[0]
    assert isinstance(f.subject, str) and isinstance(f.object, str) and f.relation == "P36"

    bags = D.pararel_bags(data_dir=data_dir)
    # independent count of the templates a decoder cannot use
    not_final = sum(1 for r in rels for p in D.load_pararel_patterns(r, data_dir)
                    if not re.search(r"\[Y\]\s*\.?\s*$", p.pattern))
    assert bags.dropped_templates == Counter({"[Y] is not at the end of the template": not_final})
    assert not_final > 0
    assert len(bags) == sum(len(D.load_pararel_facts(r, data_dir)) for r in rels)
    b = next(b for b in bags if b.relation == "P36")
    for q in b.prompts:
        assert b.subject in q and not q.endswith((".", " ")) and "[" not in q
    mlm = D.pararel_bags("P36", data_dir, mlm=True)
    assert not mlm.dropped_templates
    assert all(q.count("[MASK]") == 1 for b in mlm for q in b.prompts)


def test_template_prompt():
    assert D.template_prompt("The capital of [X] is [Y] .", "Canada") == "The capital of Canada is"
    assert D.template_prompt("[X]'s capital city is [Y].", "Italy") == "Italy's capital city is"
    assert D.template_prompt("[X] is a [Y] by profession.", "Bob") is None
    assert D.template_prompt("[X] is a [Y] by profession.", "Bob", mlm=True) == "Bob is a [MASK] by profession."


def test_counterfact(data_dir):
    recs = D.load_counterfact(data_dir=data_dir)
    assert len(recs) == 2191
    for r in random.sample(recs, 50):
        assert isinstance(r.case_id, int) and isinstance(r.target_new, str) and isinstance(r.target_true, str)
        assert r.subject in r.rewrite_prompt and "{}" not in r.rewrite_prompt
        assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10
        assert r.neighborhood_targets == [r.target_true] * 10
        assert r.relation_id.startswith("P")
    five = D.load_counterfact(data_dir / "counterfact" / "counterfact_first5_sample.json")
    assert [r.case_id for r in five] == [0, 1, 2, 3, 4]
    assert five[0].rewrite_prompt == "The mother tongue of Danielle Darrieux is"


def test_counterfact_easyedit_layout(tmp_path):
    recs = [{"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
             "target_new": "English", "ground_truth": "French",
             "rephrase_prompt": "Danielle Darrieux spoke the language",
             "locality_prompt": "The mother tongue of Montesquieu is", "locality_ground_truth": "French"},
            {"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy", "ground_truth": "France",
             "rephrase_prompt": ["Paris is located in", "Paris belongs to"],
             "locality_prompt": ["Lyon is in", "Nice is in"], "locality_ground_truth": ["France", "France"]}]
    p = tmp_path / "counterfact-edit.json"
    p.write_text(json.dumps(recs))
    got = D.load_counterfact(p)
    assert got[0].prompt == "The mother tongue of {} is" and got[0].rewrite_prompt == recs[0]["prompt"]
    assert got[0].paraphrase_prompts == [recs[0]["rephrase_prompt"]]
    assert got[0].neighborhood_prompts == [recs[0]["locality_prompt"]] and got[0].target_true == "French"
    assert got[1].case_id is None and got[1].paraphrase_prompts == recs[1]["rephrase_prompt"]
    assert got[1].neighborhood_targets == ["France", "France"]


def test_zsre_and_known(data_dir):
    z = D.load_zsre(data_dir=data_dir)
    assert len(z) == 5
    for r in z:
        assert r.subject in r.src and isinstance(r.answers, list) and all(isinstance(a, str) for a in r.answers)
        assert r.loc.startswith("nq question:") and isinstance(r.loc_ans, str)
    k = D.load_known(data_dir=data_dir)
    assert len(k) == 1209
    assert all(isinstance(x.known_id, int) and x.subject in x.prompt for x in k)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KNCORE_DATA", str(tmp_path))
    assert D.default_data_dir() == tmp_path
    with pytest.raises(DataError, match="KNCORE_DATA"):
        D.load_known()


# -- malformed records -----------------------------------------------------------------
def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = {"sub_label": "Canada", "obj_label": "Ottawa", "uuid": "u1"}
    p = tmp_path / "P36.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{\"sub_label\": \"Fra\n")
    with pytest.raises(DataError) as e:
        D.load_pararel_facts("P36", path=p)
    assert str(p) in str(e.value) and "line 3" in str(e.value)
    assert e.value.where == "line 3" and isinstance(e.value, kncore.InputError)

    bad = dict(good, obj_label=42)
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"line 3: field 'obj_label' should be a string"):
        D.load_pararel_facts("P36", path=p)


def test_malformed_blimp_and_json_list(tmp_path, data_dir):
    lines = (data_dir / "blimp" / "determiner_noun_agreement_1.jsonl").read_text().splitlines()[:4]
    rec = json.loads(lines[2])
    del rec["one_prefix_word_bad"]
    lines[2] = json.dumps(rec)
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl, line 3: missing field 'one_prefix_word_bad'"):
        D.load_blimp_file(p)

    recs = json.loads((data_dir / "known" / "known_1000.json").read_text())[:5]
    recs[3]["known_id"] = "three"
    q = tmp_path / "known.json"
    q.write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"known\.json, record 3: field 'known_id' should be an integer"):
        D.load_known(q)
    q.write_text(json.dumps(recs)[:-20])
    with pytest.raises(DataError, match=r"known\.json, line 1: invalid JSON"):
        D.load_known(q)
    q.write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="expected a JSON list"):
        D.load_zsre(q)


# -- BLiMP prompts ---------------------------------------------------------------------
def _starts(seq, prefix):
    return list(seq[: len(prefix)]) == list(prefix)


@pytest.mark.slow
def test_blimp_prompts_one_prefix_smollm(smollm, data_dir):
    pairs = D.load_blimp("determiner_noun_agreement_1", data_dir)
    res = D.build_blimp_prompts(smollm, pairs)
    assert len(res) + sum(res.dropped.values()) == res.total == 1000
    assert len(res) > 700 and set(res.dropped) <= {"a target word is more than one token", "identical words",
                                                   "a target is unknown to the tokenizer"}
    first = res[0]
    assert (first.prompt_good, first.target_good, first.target_bad) == ("Raymond is selling this", "sketch",
                                                                       "sketches")
    for x in res:
        assert x.method == "one_prefix" and x.same_prompt and x.target_good_id != x.target_bad_id
        # independent check: prompt tokens + target token begin each full sentence
        assert _starts(smollm.tokenize(x.sentence_good), smollm.tokenize(x.prompt_good) + [x.target_good_id])
        assert _starts(smollm.tokenize(x.sentence_bad), smollm.tokenize(x.prompt_bad) + [x.target_bad_id])
    assert set(res.by_class()) == {"singular", "plural"}


@pytest.mark.slow
def test_blimp_prompts_two_prefix_smollm(smollm, data_dir):
    res = D.blimp_prompts(smollm, "determiner_noun_agreement_2", data_dir)
    assert len(res) + sum(res.dropped.values()) == 1000 and len(res) > 600
    assert set(res.dropped) <= {"the shared word is more than one token",
                                "the shared word tokenises differently after the two prefixes"}
    for x in res:
        assert x.method == "two_prefix" and not x.same_prompt
        assert x.target_good == x.target_bad and x.target_good_id == x.target_bad_id
        assert _starts(smollm.tokenize(x.sentence_good), smollm.tokenize(x.prompt_good) + [x.target_good_id])
        assert _starts(smollm.tokenize(x.sentence_bad), smollm.tokenize(x.prompt_bad) + [x.target_good_id])
        det = x.prompt_good.split()[-1]
        assert x.cls == ("singular" if det in ("this", "that") else "plural")


def test_blimp_prompts_tiny_bert(data_dir):
    lm = tiny_lm("bert", seed=int(random.random() * 1000))
    res = D.blimp_prompts(lm, "determiner_noun_agreement_2", data_dir)
    assert len(res) + sum(res.dropped.values()) == 1000 and len(res) > 0
    mask = lm.tokenizer.mask_token_id
    for x in res:
        assert x.method == "masked" and x.prompt_good.count("[MASK]") == 1
        ids = lm.tokenize(x.prompt_good)
        m = ids.index(mask)
        good = list(lm.tokenizer(x.sentence_good)["input_ids"])
        bad = list(lm.tokenizer(x.sentence_bad)["input_ids"])
        assert ids[:m] + [x.target_good_id] + ids[m + 1:] == good
        assert ids[:m] + [x.target_bad_id] + ids[m + 1:] == bad
        assert x.cls == ("singular" if x.target_good in ("this", "that") else "plural")
    # one-prefix paradigm: the noun is masked; pairs whose nouns the word-level
    # vocabulary lacks are dropped, with the reason
    r1 = D.blimp_prompts(lm, "determiner_noun_agreement_1", data_dir)
    assert len(r1) + sum(r1.dropped.values()) == 1000
    assert all(x.target_good in ("sketch", "sketches", "dog", "dogs", "cat", "cats", "apple", "apples")
               for x in r1)
    assert r1.dropped["the sentences tokenise identically"] > 0  # both nouns are [UNK]


def _pair(good, bad, **kw):
    base = dict(paradigm="made_up", pair_id="0", field="syntax", linguistics_term="x", sentence_good=good,
                sentence_bad=bad, simple_lm=True, one_prefix=False, two_prefix=False, lexically_identical=False)
    base.update(kw)
    return D.BlimpPair(**base)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_blimp_prompts_token_diff_and_flags(arch):
    lm = tiny_lm(arch, seed=int(random.random() * 1000))
    pairs = [
        _pair("the dog was big .", "the dog were big ."),                  # one token differs
        _pair("the dog was big .", "the cat were big ."),                  # two tokens differ
        _pair("the dog was big .", "the dog was big ."),                   # identical
        _pair("this dog was big .", "these dog was big .", two_prefix=True, prefix_good="this",
              prefix_bad="these", shared_word="dog"),
        _pair("that apple was red .", "that apples was red .", one_prefix=True, prefix="that",
              word_good="apple", word_bad="apples"),
        _pair("that apple was red .", "that zebra was red .", one_prefix=True, prefix="that",
              word_good="apple", word_bad="zebra"),                          # zebra: not in the vocabulary
    ]
    res = D.build_blimp_prompts(lm, pairs)
    assert [x.method for x in res] == ["token_diff", "two_prefix", "one_prefix"]
    td, tp, op = res
    assert (td.prompt_good, td.target_good, td.target_bad) == ("the dog", "was", "were")
    assert td.target_good_id == lm.single_token("the dog", "was")
    assert (tp.prompt_good, tp.prompt_bad, tp.target_good) == ("this", "these", "dog")
    assert (op.prompt_good, op.target_good, op.target_bad) == ("that", "apple", "apples")
    assert res.dropped == Counter({"the sentences differ in more than one token": 1,
                                   "the sentences tokenise identically": 1,
                                   "a target is unknown to the tokenizer": 1})
