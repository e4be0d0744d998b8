"""Text rewards: answer extraction, math_answer (math-verify), exact_match, think_answer_format, TRL adapter."""

import math
import sys
import threading
import types

import pytest
import torch

import rewards
from rewards import RewardError, check_scores
from rewards.text import extract_answer, extract_boxed, extract_tag

NAN = math.nan


def _same(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


def _t(*v):
    return torch.tensor(v, dtype=torch.float32)


@pytest.fixture(scope="module")
def math_reward():
    pytest.importorskip("math_verify")
    fn = rewards.load("math_answer")
    yield fn
    fn.close()


# ---------------------------------------------------------------- extraction

def test_extract_boxed_balanced_nested_last():
    assert extract_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{\frac{\sqrt{3}}{2}} and later \boxed{7}") == "7"
    assert extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped set braces do not count
    assert extract_boxed(r"\boxed {42}") == "42"
    # the last \boxed is cut off: the last complete one wins
    assert extract_boxed(r"first \boxed{3} then \boxed{\frac{1}{") == "3"
    assert extract_boxed("no box here") is None
    assert extract_boxed(r"\boxed{") is None


def test_extract_tag_and_order():
    assert extract_tag("<answer> 5 </answer>") == "5"
    assert extract_tag("<answer>1</answer> x <answer>2</answer>") == "2"
    assert extract_tag("<answer>1</answer> <answer>2") == "1"  # an unclosed last tag is ignored
    assert extract_tag("<answer>5") is None
    assert extract_tag("<ans>5</ans>", "ans") == "5"
    text = r"<think>maybe \boxed{3}</think><answer>4</answer>"
    assert extract_answer(text) == ("answer", "4")
    assert extract_answer(text, ("boxed", "answer")) == ("boxed", "3")
    assert extract_answer("just 4", ("answer", "boxed")) is None
    assert extract_answer("  just 4 ", ("answer", "full")) == ("full", "just 4")
    assert extract_answer("<answer>  </answer>", ("answer",)) is None  # empty counts as not found
    with pytest.raises(RewardError, match="extract must be"):
        rewards.load("exact_match", extract=("tags",))


# ---------------------------------------------------------------- math_answer

MATH_TEXTS = [
    r"The sum is \boxed{\frac{1}{2}}.",                   # 0: boxed fraction vs 0.5 -> 1
    "<think>half</think><answer>0.5</answer>",            # 1: answer tag 0.5 vs \frac{1}{2} -> 1
    r"\boxed{\frac{\sqrt{3}}{2}}",                         # 2: nested braces vs \frac{\sqrt3}{2} -> 1
    r"I think \boxed{3}",                                  # 3: wrong -> 0
    "I do not know",                                       # 4: no answer -> 0
    "<answer>???</answer>",                                # 5: unparseable answer -> 0
    r"\boxed{5}",                                          # 6: key missing -> NaN
    r"\boxed{5}",                                          # 7: gold None -> NaN
    r"\boxed{5}",                                          # 8: gold unparseable -> NaN
    r"<answer>2\sqrt{3}</answer>",                         # 9: vs \sqrt{12} -> 1
    r"\boxed{72}",                                         # 10: integer gold -> 1
    r"\boxed{-1}",                                         # 11: list gold, any of -> 1
]
MATH_META = [
    {"answer": "0.5"}, {"answer": r"\frac{1}{2}"}, {"answer": r"\frac{\sqrt3}{2}"}, {"answer": "4"},
    {"answer": "4"}, {"answer": "4"}, {"question": "q"}, {"answer": None}, {"answer": "???"},
    {"answer": r"\sqrt{12}"}, {"answer": 72}, {"answer": ["1", "-1"]},
]
MATH_EXPECTED = _t(1, 1, 1, 0, 0, 0, NAN, NAN, NAN, 1, 1, 1)


def test_math_answer_hand_worked(math_reward):
    scores, info = math_reward(MATH_TEXTS, None, MATH_META)
    _same(scores, MATH_EXPECTED)
    _same(check_scores("math_answer", scores, len(MATH_TEXTS)), scores)
    assert scores.dtype == torch.float32 and scores.shape == (12,)
    # extracted: all but #4; parsed: answers compared against a parseable gold and parsed (#0-3, 9-11)
    assert info == {"extracted": 11, "parsed": 7, "correct": 6, "unscorable": 3, "timeouts": 0}
    assert math_reward.differentiable is False


def test_math_answer_no_metadata_is_all_nan_and_extraction_options(math_reward):
    scores, info = math_reward([r"\boxed{1}", "x"], None, None)
    _same(scores, _t(NAN, NAN))
    assert info["unscorable"] == 2
    text = [r"<think>\boxed{3}</think><answer>4</answer>"]
    _same(math_reward(text, None, [{"answer": "4"}])[0], _t(1))
    boxed_first = rewards.load("math_answer", extract=("boxed", "answer"), answer_key="sol", timeout_s=None)
    _same(boxed_first(text, None, [{"sol": "4"}])[0], _t(0))
    _same(boxed_first(text, None, [{"sol": "3"}])[0], _t(1))
    full = rewards.load("math_answer", extract=("answer", "full"), timeout_s=None)
    _same(full(["so the result is $\\frac{3}{4}$", "<answer>7</answer>"], None,
               [{"answer": "0.75"}, {"answer": "7"}])[0], _t(1, 1))


def test_math_verify_signal_timeout_fails_off_the_main_thread():
    """The reason for the helper process: math-verify's default (signal) timeouts raise in a thread."""
    mv = pytest.importorskip("math_verify")
    err = {}

    def run():
        try:
            mv.parse("$1$")
        except ValueError as exc:
            err["e"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert "thread" in str(err.get("e", ""))


def test_math_answer_worker_thread_matches_direct_call(math_reward):
    direct = math_reward(MATH_TEXTS, None, MATH_META)
    with rewards.AsyncScorer(math_reward, max_workers=2) as scorer:
        futs = [scorer.submit(MATH_TEXTS, None, MATH_META) for _ in range(2)]
        results = [f.result(timeout=120) for f in futs]
    for scores, info in results:
        _same(scores, direct[0])
        assert info == direct[1]
    # no time limit: judged in the calling thread (math-verify's signal timeouts off), same scores
    inproc = rewards.load("math_answer", timeout_s=None)
    with rewards.AsyncScorer(inproc) as scorer:
        scores, info = scorer.submit(MATH_TEXTS, None, MATH_META).result(timeout=120)
    _same(scores, direct[0])
    assert info == direct[1]


def test_math_answer_timeout_scores_zero_and_keeps_going():
    pytest.importorskip("math_verify")
    fn = rewards.load("math_answer", timeout_s=1)
    try:
        texts = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\frac{1}{2}}"]  # sympy would evaluate the tower forever
        with rewards.AsyncScorer(fn) as scorer:
            scores, info = scorer.submit(texts, None, [{"answer": "1"}, {"answer": "0.5"}]).result(timeout=120)
        _same(scores, _t(0, 1))
        assert info["timeouts"] == 1 and info["correct"] == 1
    finally:
        fn.close()


def test_math_answer_hard_timeout_kills_and_restarts_the_helper():
    pytest.importorskip("math_verify")
    fn = rewards.load("math_answer", timeout_s=30)
    try:
        fn._judge.hard_timeout_s = 1.0  # the parent gives up before the helper's own 30 s deadline
        texts = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{\frac{1}{2}}", r"\boxed{9^{9^{9^{9}}}}"]
        scores, info = fn(texts, None, [{"answer": "1"}, {"answer": "0.5"}, {"answer": "???"}])
        # timed out with a parseable gold -> 0; fine after the restart -> 1; an unparseable gold -> NaN
        # (the prediction is then never parsed, so no second timeout)
        _same(scores, _t(0, 1, NAN))
        assert info["timeouts"] == 1 and info["unscorable"] == 1
        assert fn._judge.restarts == 1
    finally:
        fn.close()


def test_math_answer_options_validated():
    pytest.importorskip("math_verify")
    with pytest.raises(RewardError, match="timeout_s must be"):
        rewards.load("math_answer", timeout_s=0)
    with pytest.raises(RewardError, match=r"no option\(s\) \['timeout'\]"):
        rewards.load("math_answer", timeout=3)
    with pytest.raises(RewardError, match="metadata entries"):
        rewards.load("math_answer", timeout_s=None)(["a", "b"], None, [{"answer": "1"}])
    with pytest.raises(RewardError, match="text completion must be a str"):
        rewards.load("math_answer", timeout_s=None)([1, 2], None, None)


# ---------------------------------------------------------------- exact_match

def test_exact_match_normalisation_options():
    texts = ["<answer>  Paris\n France </answer>", "<answer>paris france</answer>", r"\boxed{Rome}", " Rome ",
             "Berlin", "anything"]
    meta = [{"answer": "Paris France"}] * 2 + [{"answer": "rome"}, {"answer": "Rome"},
                                               {"answer": ["Bonn", "berlin"]}, {}]
    scores, info = rewards.load("exact_match")(texts, None, meta)
    _same(scores, _t(1, 1, 1, 1, 1, NAN))
    assert info == {"extracted": 6, "correct": 5, "unscorable": 1}
    cased = rewards.load("exact_match", case_sensitive=True)
    _same(cased(texts, None, meta)[0], _t(1, 0, 0, 1, 0, NAN))
    raw_ws = rewards.load("exact_match", normalize_whitespace=False)
    _same(raw_ws(texts, None, meta)[0], _t(0, 1, 1, 1, 1, NAN))
    tags_only = rewards.load("exact_match", extract=("answer",))
    _same(tags_only(texts, None, meta)[0], _t(1, 1, 0, 0, 0, NAN))
    _same(rewards.load("exact_match", answer_key="label")(["a"], None, [{"label": "A"}])[0], _t(1))


# ---------------------------------------------------------------- think_answer_format

FORMAT_CASES = [
    ("<think>reason</think><answer>42</answer>", 1),
    ("<think>\nstep 1\nstep 2\n</think>\n<answer>\n42\n</answer>\n", 1),
    ("  \n<think>r</think>  <answer>42</answer>  ", 1),
    ("<think></think><answer>42</answer>", 1),                    # empty reasoning is still the format
    ("<think>r</think><answer> </answer>", 0),                    # empty answer
    ("<think>r</think>", 0),
    ("<answer>42</answer>", 0),
    ("<answer>42</answer><think>r</think>", 0),
    ("Sure! <think>r</think><answer>42</answer>", 0),             # text before
    ("<think>r</think><answer>42</answer> Hope this helps", 0),   # text after
    ("<think>r</think> so <answer>42</answer>", 0),               # text between
    ("<think>a</think><think>b</think><answer>42</answer>", 0),   # duplicated tag
    ("<think>a<think>b</think><answer>42</answer>", 0),
    ("<think>r</think><answer>4<answer>2</answer>", 0),
    ("<think>r</think><answer>42</answer><answer>43</answer>", 0),
    ("<think>r<answer>42</answer>", 0),
    ("", 0),
]


def test_think_answer_format_positives_and_negatives():
    texts = [t for t, _ in FORMAT_CASES]
    scores, info = rewards.load("think_answer_format")(texts, None, None)
    _same(scores, torch.tensor([float(v) for _, v in FORMAT_CASES]))
    assert info == {"matched": sum(v for _, v in FORMAT_CASES)}


def test_think_answer_format_options():
    strict_ws = rewards.load("think_answer_format", allow_surrounding_whitespace=False)
    _same(strict_ws([" <think>r</think><answer>1</answer>", "<think>r</think>\n<answer>1</answer>"], None, None)[0],
          _t(0, 1))
    custom = rewards.load("think_answer_format", think_tag="reasoning", answer_tag="final")
    _same(custom(["<reasoning>r</reasoning><final>1</final>", "<think>r</think><answer>1</answer>"], None, None)[0],
          _t(1, 0))
    prefilled = rewards.load("think_answer_format", prefilled_think=True)  # the prompt ends with "<think>"
    _same(prefilled(["r</think><answer>1</answer>", "<think>r</think><answer>1</answer>"], None, None)[0],
          _t(1, 0))
    lenient = rewards.load("think_answer_format", require_answer=False)
    _same(lenient(["<think>r</think><answer></answer>"], None, None)[0], _t(1))
    with pytest.raises(RewardError, match="tag name"):
        rewards.load("think_answer_format", think_tag="<think>")
    chat = [[{"role": "assistant", "content": "<think>r</think><answer>1</answer>"}]]
    _same(rewards.load("think_answer_format")(chat, None, None)[0], _t(1))


# ---------------------------------------------------------------- TRL-style functions

def test_trl_function_with_none_entries_and_columns():
    seen = {}

    def accuracy(completions, solution, **kwargs):
        seen.update(kwargs, completions=completions, solution=solution)
        return [None if s is None else float(c.strip() == s) for c, s in zip(completions, solution, strict=True)]

    fn = rewards.from_trl(accuracy)
    assert fn.name == "accuracy" and fn.differentiable is False
    meta = [{"solution": "4", "level": 1}, {"solution": None, "level": 2}, {"solution": "5", "prompt": "raw"}]
    scores, info = fn(["4", "4", " 6"], ["p0", "p1", "p2"], meta)
    _same(scores, _t(1, NAN, 0))
    _same(check_scores("accuracy", scores, 3), scores)
    assert info == {}
    assert seen["prompts"] == ["p0", "p1", "p2"] and seen["completions"] == ["4", "4", " 6"]
    assert seen["level"] == [1, 2, None]  # a column some dicts lack is None there
    assert "prompt" not in seen and "completion_ids" not in seen  # as in TRL
    assert {"trainer_state", "log_extra", "log_metric"} <= set(seen) and seen["trainer_state"] is None


def test_trl_function_signatures_logging_and_async():
    def no_kwargs(completions, answer):  # no **kwargs: only the named keywords are passed
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    _same(rewards.from_trl(no_kwargs)(["1", "2"], None, [{"answer": "1"}, {"answer": "1"}])[0], _t(1, 0))
    with pytest.raises(RewardError, match=r"needs keyword\(s\) \['answer'\].*columns \['solution'\]"):
        rewards.from_trl(no_kwargs)(["1"], None, [{"solution": "1"}])

    def logs(completions, completion_ids, log_extra=None, log_metric=None, **kwargs):
        log_extra("n_ids", [len(c) for c in completion_ids])
        log_metric("mean_len", sum(len(c) for c in completions) / len(completions))
        return [float(len(c)) for c in completion_ids]

    scores, info = rewards.from_trl(logs)(["ab", "abcd"], None, [{"completion_ids": [1, 2]}, {"completion_ids": [3]}])
    _same(scores, _t(2, 1))
    assert info == {"extra": {"n_ids": [2, 1]}, "metrics": {"mean_len": 3.0}}

    async def async_len(completions, **kwargs):
        return [float(len(c)) for c in completions]

    _same(rewards.from_trl(async_len)(["a", "abc"], None, None)[0], _t(1, 3))

    def chat_format(completions, prompts, **kwargs):  # TRL conversational format
        return [float(c[0]["content"] == "yes" and p[0]["role"] == "user") for c, p in zip(completions, prompts, strict=True)]

    _same(rewards.from_trl(chat_format, conversational=True)(["yes", "no"], "q", None)[0], _t(1, 0))

    with pytest.raises(RewardError, match="clash"):
        rewards.from_trl(async_len)(["a"], None, [{"completions": 1}])
    with pytest.raises(RewardError, match=r"2 scores for 1 samples"):
        rewards.from_trl(lambda completions, **kw: [1.0, 2.0])(["a"], None, None)


def test_trl_function_through_registry_and_async_scorer(monkeypatch):
    mod = types.ModuleType("drl_test_trl_funcs")

    def starts_with_answer(completions, answer, **kwargs):
        return [None if a is None else float(c.startswith(str(a))) for c, a in zip(completions, answer, strict=True)]

    mod.starts_with_answer = starts_with_answer
    monkeypatch.setitem(sys.modules, "drl_test_trl_funcs", mod)
    fn = rewards.load("trl_function", function="drl_test_trl_funcs:starts_with_answer")
    assert fn.name == "starts_with_answer"
    meta = [{"answer": 4}, {"answer": None}, {"answer": "x"}]
    direct = fn(["4 apples", "4", "y"], None, meta)
    _same(direct[0], _t(1, NAN, 0))
    with rewards.AsyncScorer(fn) as scorer:
        _same(scorer.submit(["4 apples", "4", "y"], None, meta).result(timeout=60)[0], direct[0])
    with pytest.raises(RewardError, match="import path"):
        rewards.load("trl_function", function="no_colon_or_dot")


# ---------------------------------------------------------------- registry and multi-reward

def test_text_rewards_registered():
    for name in ("math_answer", "exact_match", "think_answer_format", "trl_function"):
        assert name in rewards.available()
        info = rewards.INFO[name]
        assert info.differentiable is False and info.weights == "-"
    fn = rewards.load("exact_match")
    with pytest.raises(RewardError, match="not differentiable"):
        fn.score_tensor(torch.zeros(1))


def test_load_multi_correctness_plus_format():
    pytest.importorskip("math_verify")
    multi = rewards.load_multi([
        {"name": "math_answer", "weight": 1.0, "label": "correct"},
        {"name": "think_answer_format", "weight": 0.5, "label": "format"},
    ])
    texts = [
        "<think>1/2</think><answer>\\frac{1}{2}</answer>",  # correct, formatted: 1.5
        "<think>hm</think><answer>3</answer>",              # wrong, formatted: 0.5
        "the answer is \\boxed{0.5}",                        # correct, unformatted: 1.0
        "no idea",                                           # neither: 0
        "<think>x</think><answer>1</answer>",                # no ground truth: NaN
    ]
    meta = [{"answer": "0.5"}] * 4 + [{}]
    try:
        scores, info = multi(texts, ["q"] * 5, meta)
        with rewards.AsyncScorer(multi) as scorer:
            async_scores, async_info = scorer.submit(texts, ["q"] * 5, meta).result(timeout=120)
    finally:
        multi.components["correct"].close()
    _same(scores, _t(1.5, 0.5, 1.0, 0.0, NAN))
    _same(info["components"]["correct"], _t(1, 0, 1, 0, NAN))
    _same(info["components"]["format"], _t(1, 1, 0, 0, 1))
    assert info["weights"] == {"correct": 1.0, "format": 0.5}
    assert info["component_info"]["correct"]["correct"] == 2
    _same(async_scores, scores)
