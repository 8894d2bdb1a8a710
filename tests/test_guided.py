"""Guided decoding in the engine (in-process): every answer of the demo and the `small` model
validates against its schema (a corpus of 60, greedy and sampled, one engine running them all at
once), regexes / choices / grammars match, and the grammar state survives preemption and resumption;
seeded sampling stays reproducible; bad specs are refused naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from guided_corpus import corpus
from raymoe.model.completion import complete
from raymoe.model.default import default_checkpoint
from raymoe.model.engine import Engine
from raymoe.model.errors import InvalidRequest
from raymoe.model.guided import GrammarCache, GuidedLimits, GuidedSpec, StepMasks
from raymoe.model.sampling import SamplingParams
from raymoe.model.tokenizer import Tokenizer
from raymoe.model.weights import load_model

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                                           "note": {"type": ["string", "null"], "maxLength": 8}},
          "required": ["n", "tags", "note"], "additionalProperties": False}


@pytest.fixture(scope="module")
def demo():
    ckpt = default_checkpoint()
    model, tok = load_model(ckpt), Tokenizer(ckpt)
    return model, tok, GrammarCache(tok, model.cfg.vocab_size, model.cfg.eos_token_ids)


@pytest.fixture(scope="module")
def small(small_preset):
    model, tok = small_preset
    return model, tok, GrammarCache(tok, model.cfg.vocab_size, model.cfg.eos_token_ids)


def _spec(schema: dict) -> GuidedSpec:
    return GuidedSpec("json_schema", json.dumps(schema))


# `small` (95M parameters, drawn at random once per session) takes most of a minute on 2 cores: slow.
@pytest.mark.parametrize("which", ["demo", pytest.param("small", marks=pytest.mark.slow)])
def test_every_answer_of_the_corpus_validates(which, request):
    model, tok, grammars = request.getfixturevalue(which)
    schemas = corpus()
    assert len(schemas) >= 50
    prompt = tok.encode("Answer in JSON:")
    params = []
    for k, schema in enumerate(schemas):
        g = grammars.compile(_spec(schema))
        params += [SamplingParams(max_tokens=160, guided=g),
                   SamplingParams(max_tokens=160, temperature=1.0, seed=k, guided=g)]
    engine = Engine(model, max_running=len(params), kv_cache_tokens=len(params) * 256)  # one batch for all
    answers = complete(engine, tok, [prompt] * len(params), params)
    for i, answer in enumerate(answers):
        assert answer.finish_reason == "stop", (i, answer.text)
        jsonschema.validate(json.loads(answer.text), schemas[i // 2])


def test_regex_choice_and_grammar(demo):
    model, tok, grammars = demo
    specs = [GuidedSpec("regex", r"[a-c]{2}-\d{3}"), GuidedSpec("choice", json.dumps(["yes", "no", "perhaps"])),
             GuidedSpec("grammar", 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?')]
    check = [lambda t: re.fullmatch(r"[a-c]{2}-\d{3}", t), lambda t: t in ("yes", "no", "perhaps"),
             lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t)]
    params = [SamplingParams(max_tokens=48, temperature=t, seed=3, guided=grammars.compile(s))
              for s in specs for t in (0.0, 1.0)]
    answers = complete(Engine(model), tok, [tok.encode("12+34=")] * len(params), params)
    for i, a in enumerate(answers):
        assert a.finish_reason == "stop" and check[i // 2](a.text), (specs[i // 2].kind, a.text)


def test_grammar_survives_preemption_and_resumption_and_seeds_reproduce(demo):
    """A cache so small that sequences are preempted and recomputed gives the answers of a roomy one;
    a resumed sequence (its first tokens replayed through the matcher) continues as it would have;
    the same seed gives the same answer alone and in a batch."""
    model, tok, grammars = demo
    g = grammars.compile(_spec(SCHEMA))
    prompt = tok.encode("7+8=")
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, guided=g) for s in range(6)]
    roomy = complete(Engine(model), tok, [prompt] * 6, params)
    tight_engine = Engine(model, kv_cache_tokens=160, block_size=16)
    tight = complete(tight_engine, tok, [prompt] * 6, params)
    assert tight_engine.preemptions > 0
    assert [a.token_ids for a in tight] == [a.token_ids for a in roomy]
    alone = complete(Engine(model), tok, [prompt], params[2:3])[0]
    assert alone.token_ids == roomy[2].token_ids
    for a in roomy:
        jsonschema.validate(json.loads(a.text), SCHEMA)
    full = roomy[4].token_ids
    engine = Engine(model)
    seq = engine.add("resumed", prompt, params[4], output_ids=full[:7])
    while engine.has_work():
        engine.step()
    assert seq.output_ids == full
    with pytest.raises(InvalidRequest, match="resume_token_ids"):  # tokens the grammar never allows
        engine.add("wrong", prompt, params[4], output_ids=tok.encode("abc", bos=False))


def test_steps_without_grammar_build_no_masks(demo):
    model, tok, grammars = demo

    class Seq:
        guide = None
    assert StepMasks.start([Seq(), Seq()], model.cfg.vocab_size) is None
    plain = complete(Engine(model), tok, [tok.encode("12+34=")], [SamplingParams(max_tokens=8)])[0]
    assert plain.text == "46"


def test_bad_specs_name_their_field_and_the_cache_is_bounded(demo):
    model, tok, _ = demo
    grammars = GrammarCache(tok, model.cfg.vocab_size, model.cfg.eos_token_ids,
                            GuidedLimits(max_spec_bytes=2000, compile_timeout_s=5, cache_size=2))
    bad = [GuidedSpec("json_schema", "{not json", "response_format"),
           GuidedSpec("json_schema", json.dumps({"type": "objekt"}), "response_format"),
           GuidedSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "x"}}}), "f"),
           GuidedSpec("regex", "([a-", "guided_decoding.regex"),
           GuidedSpec("grammar", 'root ::= "a" |', "guided_decoding.grammar"),
           GuidedSpec("grammar", 'start ::= "a"', "guided_decoding.grammar"),
           GuidedSpec("choice", "[]", "guided_decoding.choice"),
           GuidedSpec("json_schema", json.dumps({"enum": ["x" * 50] * 50}), "response_format")]  # too large
    for spec in bad:
        with pytest.raises(InvalidRequest) as e:
            grammars.compile(spec)
        assert e.value.field == spec.field, (spec, e.value)
    specs = [GuidedSpec("regex", f"a{{{k}}}") for k in (1, 2, 3)]
    grammars.hits = grammars.misses = 0
    first = grammars.compile(specs[0])
    assert grammars.compile(GuidedSpec("regex", "a{1}")) is first  # by the spec's hash
    grammars.compile(specs[1])
    grammars.compile(specs[2])  # the least recently used (specs[0]) goes
    assert grammars.compile(specs[0]) is not first and grammars.misses == 4 and grammars.hits == 1


def test_masked_sampling_only_draws_allowed_tokens():
    from raymoe.model.sampling import sample

    logits = torch.randn(4, 50)
    allowed = torch.zeros(4, 50, dtype=torch.bool)
    allowed[:, [3, 17, 42]] = True
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=2.0, top_k=2),
              SamplingParams(temperature=0.7, top_p=0.5)]
    for pos in range(20):
        out = sample(logits, params, [1, 2, 3, 4], [pos] * 4, allowed=allowed)
        assert set(out.token_ids) <= {3, 17, 42} and not out.failed
