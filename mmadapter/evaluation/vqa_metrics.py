"""VQA-style metrics, each as its benchmark defines it.

- `vqa_accuracy`: the VQA challenge's accuracy (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/
  vqaEval.py): the mean over the leave-one-out subsets of the human answers of min(1, matches / 3), after the
  official answer normalisation, applied where the official script applies it. Two releases differ:
  "vqa" follows the current script (2021): the model's and the humans' answers get punctuation and
  digit/article processing only when the humans disagree, and neither is touched when they all agree;
  "vqa2017" follows the v2.0 release of 2017: the model's answer always gets both steps, the humans'
  answers get punctuation processing only, and only when they disagree (so a human "one" never equals
  a model "one", which became "1").
- `exact_match`: GQA-style, the normalised answer equals a normalised reference.
- `mme_scores`: MME's acc (over questions) and acc+ (over images with every question right) per
  subtask, score = (acc + acc+) x 100, and the perception / cognition totals.
- `pope_scores`: POPE's accuracy, precision, recall and F1 of "yes", and the ratio of "yes" answers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

METRICS = ("vqa", "vqa2017", "exact", "mme", "pope")

# The official normalisation tables, in the official order where order matters (punctuation).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# Written without apostrophe -> with it; the official table, quirks included ("somebody'd" maps to
# "somebodyd"; the capitalised keys can never match because words are lower-cased first).
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've
I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am
mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at
shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd
somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've
they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've
we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll
whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll
youre you're|youve you've"""
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTION_PAIRS.replace("\n", "|").split("|") if pair)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # the official script passes re.UNICODE (32) as sub's count: at most 32 periods go

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def process_punctuation(text: str) -> str:
    """The official punctuation step: a mark next to a space (or any mark in a text with a digit,digit
    comma) is deleted, otherwise replaced by a space; periods not followed by a digit are deleted."""
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or glued:  # tested on the input, as the official does
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """The official word step: lower case, number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Both official steps (what `exact_match` compares)."""
    return process_digit_article(process_punctuation(_clean(text)))


def vqa_accuracy(answer: str, human_answers: Sequence[str], version: str = "vqa") -> float:
    """Accuracy in [0, 1] of one answer against the human answers (`version`: "vqa" or "vqa2017")."""
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    disagree = len(set(human_answers if version == "vqa2017" else map(_clean, human_answers))) > 1
    if version == "vqa":
        humans = [_clean(h) for h in human_answers]
        answer = _clean(answer)
        if disagree:
            humans = [normalize_answer(h) for h in humans]
            answer = normalize_answer(answer)
    elif version == "vqa2017":
        humans = [process_punctuation(h) if disagree else h for h in human_answers]
        answer = normalize_answer(answer)
    else:
        raise ValueError(f"unknown VQA accuracy version {version!r}; use vqa or vqa2017")
    matches = [human == answer for human in humans]
    total = sum(matches)
    # each human answer left out in turn: matches among the others
    per_subset = [min(1, float(total - left_out) / 3) for left_out in matches]
    return float(sum(per_subset)) / len(per_subset)


def exact_match(answer: str, references: Sequence[str]) -> float:
    """1.0 when the normalised answer equals any normalised reference, else 0.0."""
    got = normalize_answer(answer)
    return float(any(normalize_answer(ref) == got for ref in references))


_FIRST_WORD = re.compile(r"[A-Za-z]+")


def parse_yes_no(text: str) -> str | None:
    """"yes" or "no" when the answer's first word is one of them (any case, punctuation around), else None."""
    word = _FIRST_WORD.search(text)
    if word is None or text[:word.start()].strip(" \t\n\"'*`([{:-.,!"):
        return None
    return word.group().lower() if word.group().lower() in ("yes", "no") else None


def question_score(metric: str, answer: str, references: Sequence[str]) -> float:
    """The per-question score in [0, 1] that `metric` averages (mme and pope: the yes/no answer is right)."""
    if metric in ("vqa", "vqa2017"):
        return vqa_accuracy(answer, references, metric)
    if metric == "exact":
        return exact_match(answer, references)
    if metric in ("mme", "pope"):
        gold = parse_yes_no(references[0]) if references else None
        return float(gold is not None and parse_yes_no(answer) == gold)
    raise ValueError(f"unknown metric {metric!r}; use one of: {', '.join(METRICS)}")


def pope_scores(pairs: Iterable[tuple[str | None, str]]) -> dict[str, Any]:
    """POPE's metrics in percent over (parsed prediction or None, gold "yes"/"no") pairs.

    "yes" is the positive class. An unparsed prediction is neither yes nor no: it is wrong, counted in
    "unparsed", and a missed "yes" (a false negative) when the gold answer is yes.
    """
    tp = fp = tn = fn = unparsed = n = predicted_yes = 0
    for pred, gold in pairs:
        n += 1
        unparsed += pred is None
        predicted_yes += pred == "yes"
        if gold == "yes":
            tp += pred == "yes"
            fn += pred != "yes"
        else:
            fp += pred == "yes"
            tn += pred == "no"
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": _pct((tp + tn) / n) if n else None, "precision": _pct(precision), "recall": _pct(recall),
            "f1": _pct(f1), "yes_ratio": _pct(predicted_yes / n) if n else None, "questions": n,
            "unparsed": unparsed, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def mme_scores(rows: Iterable[tuple[str, str, bool]]) -> dict[str, Any]:
    """MME's per-subtask acc, acc+ and score, and the perception / cognition totals.

    rows: (subtask, image key, answer right). acc = right questions / questions; acc+ = images whose
    questions are all right / images; score = (acc + acc+) x 100. A subtask outside MME's lists is
    scored but left out of both totals (and listed under "unknown_subtasks").
    """
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for subtask, image, right in rows:
        questions[subtask].append(right)
        images[subtask][image].append(right)
    subtasks = {}
    for name, flags in questions.items():
        acc = sum(flags) / len(flags)
        acc_plus = sum(all(v) for v in images[name].values()) / len(images[name])
        subtasks[name] = {"acc": _pct(acc), "acc_plus": _pct(acc_plus), "score": _round((acc + acc_plus) * 100),
                          "questions": len(flags), "images": len(images[name])}
    return {"subtasks": dict(sorted(subtasks.items())),
            "perception": _round(sum(subtasks[s]["score"] for s in MME_PERCEPTION if s in subtasks)),
            "cognition": _round(sum(subtasks[s]["score"] for s in MME_COGNITION if s in subtasks)),
            "unknown_subtasks": sorted(set(subtasks) - set(MME_PERCEPTION) - set(MME_COGNITION))}


def _pct(fraction: float) -> float:
    return _round(100 * fraction)


def _round(value: float) -> float:
    return round(value, 2)
