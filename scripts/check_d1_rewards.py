"""Cross-check rewards/d1.py against d1's own code: every ``d1_*`` training reward and every d1
evaluation parse rule, item by item, against the d1 function it reproduces (github.com/
dllm-reasoning/d1: diffu-grpo/reward_func.py, diffu-grpo/math500_utils.py,
eval/parse_and_get_acc.py, eval/parser_helper.py, eval/parsers.py).

    git clone https://github.com/dllm-reasoning/d1 /path/to/d1    # not vendored here
    .venv/bin/python scripts/check_d1_rewards.py --d1-repo /path/to/d1
    .venv/bin/python scripts/check_d1_rewards.py --d1-repo /path/to/d1 --write-fixture tests/fixtures/d1_rewards.json

Inputs: (a) every generation in the checkout's eval/eval_baselines/*_generations.json (d1's
LLaDA-8B-Instruct evaluation outputs), scored as training completions too, with the reward columns
built from each item's ground truth as d1's training data would hold them; (b) the messy
completions and items written below (`written_cases`); (c) where ``--data`` holds them (default
../shared/data), GSM8K train/test and MATH-500 rows: the gold d1 derives from each solution. Also
checked: the accuracy table d1's ``aggregate_results`` prints for the baselines, and
`d1_eval_record` rebuilding every baseline item.

d1's modules are imported from the checkout by path. Its prints are swallowed, numpy is seeded
before every call of a d1 function that draws from it (only to decide whether to print), and
modules it imports but these functions do not use are stubbed when missing: tiktoken (token counts,
not compared; also stubbed when its encoding cannot be loaded offline), torch, transformers, tqdm.
``--write-fixture`` writes the cases of (b) only, never d1's generation texts, with d1's results,
for tests/test_rewards_d1.py. Exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
import types
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from rewards import get_reward  # noqa: E402
from rewards.d1 import (_arith_value, _Unevaluable, d1_eval_accuracy, d1_eval_item, d1_eval_record,  # noqa: E402
                        d1_gsm8k_gold)

REWARDS = ("d1_xmlcount", "d1_soft_format", "d1_strict_format", "d1_int", "d1_gsm8k", "d1_math", "d1_math_format",
           "d1_countdown", "d1_sudoku")
EVAL_TASKS = ("gsm8k", "math", "countdown", "sudoku")
FORMAT_REWARDS = ("d1_xmlcount", "d1_soft_format", "d1_strict_format", "d1_int", "d1_math_format")


# ------------------------------------------------------------------------------------------------
# d1's code
# ------------------------------------------------------------------------------------------------


def _stub(name: str, **attrs) -> None:
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
        mod_name = ".".join(parts[:k])
        if mod_name not in sys.modules:
            sys.modules[mod_name] = types.ModuleType(mod_name)
        if k > 1:
            setattr(sys.modules[".".join(parts[:k - 1])], parts[k - 1], sys.modules[mod_name])
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


def _tiktoken_usable() -> bool:
    if importlib.util.find_spec("tiktoken") is None:
        return False
    try:
        import tiktoken

        tiktoken.get_encoding("cl100k_base")
        return True
    except Exception:  # noqa: BLE001 - offline: the encoding file cannot be fetched
        for name in [m for m in sys.modules if m == "tiktoken" or m.startswith("tiktoken.")]:
            del sys.modules[name]
        return False


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_d1(repo: Path) -> types.SimpleNamespace:
    if not _tiktoken_usable():
        _stub("tiktoken", get_encoding=lambda name: types.SimpleNamespace(encode=lambda text: text.split()))
    if importlib.util.find_spec("torch") is None:
        _stub("torch.nn.functional")
    if importlib.util.find_spec("transformers") is None:
        _stub("transformers", AutoTokenizer=None, AutoModel=None)
    if importlib.util.find_spec("tqdm") is None:
        _stub("tqdm", tqdm=lambda x, **k: x)
    # d1 imports these two by bare name
    math500_utils = _load("math500_utils", repo / "diffu-grpo" / "math500_utils.py")
    _load("parser_helper", repo / "eval" / "parser_helper.py")
    return types.SimpleNamespace(
        math500_utils=math500_utils,
        reward_func=_load("d1_reward_func", repo / "diffu-grpo" / "reward_func.py"),
        parse=_load("d1_parse_and_get_acc", repo / "eval" / "parse_and_get_acc.py"),
        parsers=_load("d1_parsers", repo / "eval" / "parsers.py"),
    )


@contextlib.contextmanager
def quiet():
    """d1 prints, and its eval can raise SyntaxWarnings; numpy seeded for its print coin."""
    import numpy as np

    np.random.seed(0)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Raised:
    """What `outcome` gives for a call that raised."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<raises {self.name}>"


def outcome(fn):
    """fn(), or `Raised` with the exception's name."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return Raised(type(e).__name__)


def d1_column(reward: str, columns: dict) -> dict:
    """The columns as d1's training data holds them."""
    if reward == "d1_gsm8k":
        gold = columns["answer"]
        return {"answer": gold.split("####")[1].strip() if "####" in gold else gold}
    if reward == "d1_countdown":
        return {"numbers": columns.get("nums", columns.get("numbers")), "target": columns["target"]}
    return dict(columns)


def d1_reward(d1, reward: str, completion: str, columns: dict):
    rf = d1.reward_func
    chat = [[{"role": "assistant", "content": completion}]]
    prompts = [[{"role": "user", "content": "question"}]]
    cols = {k: [v] for k, v in d1_column(reward, columns).items()}
    call = {
        "d1_xmlcount": lambda: rf.xmlcount_reward_func(completions=chat),
        "d1_soft_format": lambda: rf.soft_format_reward_func(completions=chat),
        "d1_strict_format": lambda: rf.strict_format_reward_func(completions=chat),
        "d1_int": lambda: rf.int_reward_func(completions=chat),
        "d1_gsm8k": lambda: rf.correctness_reward_func(prompts=prompts, completions=chat, **cols),
        "d1_math": lambda: rf.correctness_reward_func_math(prompts=prompts, completions=chat, **cols),
        "d1_math_format": lambda: rf.boxed_and_answer_tags_format_reward(prompts=prompts, completions=chat,
                                                                         answer=cols.get("answer", [""])),
        "d1_countdown": lambda: rf.countdown_reward_func(prompts=prompts, completions=chat, run_name="check", **cols),
        "d1_sudoku": lambda: rf.sudoku_reward_func(prompts=prompts, completions=chat, run_name="check", **cols),
    }[reward]
    with quiet():
        got = outcome(call)
    return got if isinstance(got, Raised) else float(got[0])


def our_reward(reward: str, completion: str, columns: dict):
    fn = get_reward(reward)
    got = outcome(lambda: fn(prompts=[[{"role": "user", "content": "question"}]],
                             completions=[[{"role": "assistant", "content": completion}]],
                             **{k: [v] for k, v in columns.items()}))
    return got if isinstance(got, Raised) else got[0]


def same_reward(ours, theirs) -> bool:
    if isinstance(theirs, Raised) or isinstance(ours, Raised):
        return isinstance(theirs, Raised) and isinstance(ours, Raised)  # both raise
    return ours is not None and float(ours) == theirs


def same_value(a, b) -> bool:
    """Equal and of the same type (two NaNs count as equal)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


EVAL_KEYS = {"gsm8k": ("extracted_answer", "is_correct"), "math": ("extracted_answer", "is_correct"),
             "countdown": ("extracted_answer", "evaluation_result", "is_correct"),
             "sudoku": ("extracted_answer", "correct_cells", "empty_cells", "accuracy")}
D1_PARSERS = {"gsm8k": "parse_gsm_answers", "math": "parse_math_answers", "countdown": "parse_countdown_answers",
              "sudoku": "parse_sudoku_answers"}


def d1_eval_items(d1, task: str, items: list[dict]) -> list:
    """d1's per-item results, one call per item (so that an item where d1 raises stays one item)."""
    parse = getattr(d1.parse, D1_PARSERS[task])
    out = []
    for item in items:
        with quiet():
            got = outcome(lambda: parse(json_data={"generations": [item]})[2][0])
        out.append(got if isinstance(got, Raised) else {k: got[k] for k in EVAL_KEYS[task]})
    return out


def d1_eval_totals(d1, task: str, items: list[dict]):
    """d1's (correct, processed) for the items, or None where its parser raises."""
    parse = getattr(d1.parse, D1_PARSERS[task])
    with quiet():
        got = outcome(lambda: parse(json_data={"generations": items}))
    return None if isinstance(got, Raised) else got[:2]


def our_eval_item(task: str, item: dict):
    got = outcome(lambda: d1_eval_item(task, item))
    return got if isinstance(got, Raised) else {k: got[k] for k in EVAL_KEYS[task]}


def same_eval(ours, theirs) -> bool:
    if isinstance(ours, Raised) or isinstance(theirs, Raised):
        return isinstance(ours, Raised) and isinstance(theirs, Raised)
    return all(same_value(ours[k], theirs[k]) for k in theirs)


# ------------------------------------------------------------------------------------------------
# (b) written cases
# ------------------------------------------------------------------------------------------------

REASONING = "Add 3 and 4 to get 7."
MULTILINE = "First, 3 + 4 = 7.\nThen 7 * 2 = 14."

# completion templates: {r} reasoning, {a} answer, {b} a second answer
TEMPLATES = [
    "<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>\n",
    "<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>",
    "<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>\n\n",
    "<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>\n\n\n",
    "<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>\nSo that is the answer.",
    "<reasoning>\n" + MULTILINE + "\n</reasoning>\n<answer>\n{a}\n</answer>\n",
    "<reasoning>{r}</reasoning><answer>{a}</answer>",
    "<reasoning>{r}</reasoning>\n\n<answer>{a}</answer> trailing words",
    " <reasoning>{r}</reasoning><answer>{a}</answer>",
    "\n<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>\n",
    "\n{r}\n</reasoning>\n<answer>\n{a}\n</answer><|eot_id|><|endoftext|><|endoftext|>",
    "<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>\n<answer>\n{b}\n</answer>\n",
    "<reasoning>\n{r} The answer is <answer>{b}</answer>.\n</reasoning>\n<answer>\n{a}\n</answer>\n",
    "<answer>{a}</answer>",
    "<answer>\n{a}\n",
    "{a}",
    "The answer is {a}.",
    "<reasoning>\r\n{r}\r\n</reasoning>\r\n<answer>\r\n{a}\r\n</answer>\r\n",
    "<reasoning>\n<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>\n",
    "<reasoning>\n{r}\n</reasoning>\n<answer>\n\n{a}\n\n</answer>\n",
    "<reasoning>\n{r}\n</reasoning>\n</answer>\n{a}\n<answer>\n",
    "<reasoning>\n{r}\n</reasoning>\n<answer>\n{a}\n</answer>\n<reasoning>\nagain\n</reasoning>\n",
]

ANSWERS = [
    "72", "1,000", "1000", "-5", "72.0", "$72", " 72 ", "\\boxed{72}", "\u00b2", "\u0663", "7 2", "seventy-two", "0",
    "007", "3/4", "\\frac{3}{4}", "\\dfrac34", "\\tfrac{3}{4}", "0.5", ".5", "\\frac12", "k = 5", "x=5", "\\boxed 5",
    "\\boxed 5$ or so", "$\\boxed{5}$", "\\boxed{5", "\\boxed{{5}}", "\\fbox{5}", "\\boxed{k = 5}", "\b" + "oxed{5}",
    "\u22125", "87 - 85 + 60", "\\boxed{87 - 85 + 60}", "\\boxed{\\frac{1}{2}} and then \\boxed{3}",
    "\\boxed{\\left( 1, 2 \\right)}", "\\boxed{(1,2)}", "\\boxed{x/y}", "\\boxed{5 \\text{ cm}}",
    "\\boxed{5 \\text{ cm}\\text{ m}}", "\\boxed{\\sqrt3}", "\\boxed{\\sqrt}", "\\boxed{\\frac}", "\\boxed{\\frac1}",
    "\\boxed{90^\\circ}", "\\boxed{10\\%}", "\\boxed{\\$5}", "\\boxed{12\\sqrt{2}}", "\\boxed{12 \\sqrt 2}",
    "4132231434211243", "4 1 3 2\n2 3 1 4\n3 4 2 1\n1 2 4 3", "", "...", "\\boxed{10" + "\\" * 4 + "%%}",
]

GSM8K_GOLDS = ["72", "1,000", "1000", "-5", "5", "0",
               "Ann sells 9 eggs at $8 each.\nShe makes 9 * 8 = $72.\n#### 72"]
MATH_GOLDS = ["The answer is $\\boxed{72}$.", "So $x = \\boxed{\\frac{3}{4}}$.", "\\boxed{5}", "\\boxed 5$ so",
              "So \\fbox{5}", "5", "\\boxed{0.5}", "\\boxed{-5}", "\\boxed{1,000}", "$\\boxed{12 \\sqrt{2}}$",
              "\\boxed{\\left( 1, 2 \\right)}", "\\boxed{90^\\circ}", "\\boxed{\\text{ cm}\\text{ m}}", "\\boxed{x/y}",
              "\\boxed{10\\%}", "\\boxed{\\dfrac{1}{2}}", "\\boxed{\\frac{1}{2}}\\boxed{3}"]

COUNTDOWN = [  # (numbers, target, completion)
    ([60, 85, 87], 62, "<answer>87 - 85 + 60</answer>"),
    ([60, 85, 87], 62, "<reasoning>\nTry it.\n</reasoning>\n<answer>\n87 - 85 + 60\n</answer>\n"),
    ([60, 85, 87], 62, "<answer> \\boxed{87 - 85 + 60} </answer>"),
    ([60, 85, 87], 62, "<answer>(85 - 60) - 25</answer>"),
    ([60, 85, 87], 62, "<answer>87 - 85 + 60 = 62</answer>"),
    ([60, 85, 87], 62, "<answer>87 \u2212 85 + 60</answer>"),
    ([60, 85, 87], 62, "<answer>87 - 85 + 60</answer> and <answer>87 + 85 - 60</answer>"),
    ([60, 85, 87], 62, "<answer>87 + 85 - 60</answer> and <answer>87 - 85 + 60</answer>"),
    ([60, 85, 87], 62, "<answer>87 - 85 + 60"),
    ([60, 85, 87], 62, "87 - 85 + 60"),
    ([60, 85, 87], 62, "<answer></answer>"),
    ([60, 85, 87], 62, "<answer>87-85+60</answer>trailing text"),
    ([60, 85, 87], 62, "<answer>\n(87 - 85)\n+ 60\n</answer>"),
    ([60, 85, 87], 62, "<answer>(87 - 85\n+ 60)</answer>"),
    ([60, 85, 87], 62, "<answer>87 - 85 + 60.0</answer>"),
    ([60, 85, 87], 62, "<answer>87 - 85 + 060</answer>"),
    ([60, 85, 87], 62, "<answer>87 - 85 + 60 + 0</answer>"),
    ([60, 85, 87], 62, "<answer>60 + 87 - 85</answer>"),
    ([60, 85, 87], 62, "<answer>60, 85, 87</answer>"),
    ([85, 85, 60], 62, "<answer>60 / (85 - 85)</answer>"),
    ([85, 85, 60], 0, "<answer>(85 - 85) // 60</answer>"),
    ([3, 3, 1], 1, "<answer>1 / 3 * 3</answer>"),
    ([10, 3, 3], 1, "<answer>10 / 3 * 3 / 10</answer>"),
    ([2, 3, 1], 8, "<answer>2 ** 3 * 1</answer>"),
    ([7, 2, 1], 3, "<answer>7 // 2 * 1</answer>"),
    ([7, 2, 1], 3, "<answer>7 // 2 // 1</answer>"),
    ([8, 2, 1], 3, "<answer>(-8) ** (1/2) + 1</answer>"),
    ([3, 1, 2], 5, "<answer>--3 + 1 * 2</answer>"),
    ([3, 1, 2], 5, "<answer>+3 + -(-1) * 2</answer>"),
    ([3, 1, 2], 5, "<answer>(3)(1) + 2</answer>"),
    ([3, 1, 2], 5, "<answer>()*3 + 1 + 2</answer>"),
    ([3, 1, 2], 5, "<answer>3 + 1 + 2 + ...</answer>"),
    ([3, 1, 2], 6, "<answer>3 \u00d7 1 \u00d7 2</answer>"),
    ([3, 1, 2], 6, "<answer>3 * 1 * 2</answer>"),
    ([3, 1, 2], 6, "<answer>3 * 1 * \u0662</answer>"),
    ([3, 1, 2], 6, "<answer>3 * 1 * 2\u00a0</answer>"),
    ([3, 1, 2], 6, "<answer>3\t*\x0c1 * 2</answer>"),
    ([3, 1, 2], 6, "<answer>3 * 1 * 2 =</answer>"),
    ([15, 5, 2], 5, "<answer>15 / 5 + 2</answer>"),
    ([15, 5, 2], 5, "<answer>15/5+2</answer>"),
    ([1, 2, 3], 6, "<answer>1 + 2 + 3</answer>"),
    ([1, 2, 3], 6, "<answer>1 2 3</answer>"),
    ([1, 2, 3], 6, "<answer>(1 + 2 + 3</answer>"),
    ([1, 2, 3], 6, "<answer>1 + 2 + 3)</answer>"),
    ([1, 2, 3], 6, "<answer>1 + 2 + 3.</answer>"),
    ([1, 2, 3], 6, "<answer>1. + 2 + 3</answer>"),
    ([1, 2, 3], 6, "<answer>1..2 + 3</answer>"),
    ([1, 2, 3], 6, "<answer>" + "-" * 1200 + "1 + 2 + 3</answer>"),
    ([1, 2, 3], 4, "<answer>" + "-" * 1201 + "1 + 2 + 3</answer>"),
    ([1, 2, 3], 6, "<answer>" + "(" * 250 + "1 + 2 + 3" + ")" * 250 + "</answer>"),
    ([1, 2, 3], 6, "<answer>1 +\n2 + 3</answer>"),
    ([100, 10, 3], 1000, "<answer>100 * 10 ** (3 - 3 + 1)</answer>"),
    ([99, 98, 99, 98], 1, "<answer>99 ** 98 // 99 ** 98</answer>"),
    ([9, 9, 7], 1, "<answer>9 ** 9 ** 7</answer>"),  # 15M bits: d1 takes seconds, ours stops at 2**20 bits
]

SUDOKU_PUZZLES = [("0032000434000040", "4132231434211243"), ("3400010042300300", "3412214342311324"),
                  ("4312123434212143", "4312123434212143")]  # made with rewards.sudoku.make_sudoku_dataset
SUDOKU_GRIDS = [
    "<answer>\n{s}\n</answer>", "<answer>{s}</answer>", "<answer>\n{spaced}\n</answer>",
    "<answer>\n{rows}\n</answer>", "<answer>\n{piped}\n</answer>", "<answer>\n{listed}\n</answer>",
    "<answer>\n{short}\n</answer>", "<answer>\n{long}\n</answer>", "<answer>\n{s}", "{s}", "The grid is {s}.",
    "<answer>\n```\n{rows}\n```\n</answer>", "<answer>\nHere:\n```\n{s}\n```\n</answer>",
    "<answer>\n{s}\n</answer><|eot_id|><|endoftext|>", "<answer>\n{s}<|eot_id|>", "</answer>\n{s}<|endoftext|>",
    "</answer>\n{rows}\n", "</answer>\n{s}", "Solved: {s}</answer>", "<answer>\n\n</answer>\n{s}",
    "<answer>\n{wrong}\n</answer>", "<answer>\n{s}\n</answer>\n<answer>\n{wrong}\n</answer>",
    "<answer>\n{wrong}\n</answer>\n<answer>\n{s}\n</answer>", "<answer>\n{sup}\n</answer>",
    "<answer>\n{arabic}\n</answer>", "<answer>{s}{s}</answer>", "no digits here", "",
    "<answer>\n{s}0\n</answer>", "<reasoning>\n{rows}\n</reasoning>\n<answer>\nsee above\n</answer>",
    "<answer>\n[{commas}]\n</answer>",
]
SUDOKU_QUESTIONS = ["Solve the following Sudoku puzzle: {p}\n", "{p}", "Solve the following Sudoku puzzle: {p}",
                    "{p}\nextra words"]

GSM8K_GENERATIONS = [
    "\nSo the total is 72.\n</reasoning>\n<answer>\n\\boxed{72}\n</answer><|eot_id|>",
    "<answer>\n72\n</answer>", "<answer>\nThe answer is 18 dollars, not 72\n</answer>", "\\boxed{1,000}",
    "<answer>1,000</answer>", "\\boxed{...} then \\boxed{72}", "\\boxed{  } \\boxed{....} \\boxed{72.0}",
    "\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{-5}", "\\boxed{\u22125}", "\\boxed{$72}",
    "\\boxed{72 dollars}", "\\boxed{inf}", "\\boxed{nan}", "\\boxed{1e3}", "\\boxed{1_000}", "\\boxed{ 72 }",
    "\\boxed{72\n}", "\\boxed{\u0667\u0662}", "<answer>\u0667\u0662</answer>", "<answer>seventy-two</answer>",
    "<answer></answer> \\boxed{x}", "\\boxed{x} <answer>72</answer>", "<answer>72</answer><answer>5</answer>",
    "72", "", "\\boxed{72} \\boxed{5}", "\\boxed{abc} \\boxed{5}", "<answer>\n5.\n</answer>", "<answer>-5.</answer>",
    "<answer>3 - 8</answer>", "\\boxed{1000.00}", "\\boxed 72", "<answer>\n\\boxed{72}\n", "\\boxed{{72}}",
]
GSM8K_TRUTHS = ["#### 72", "#### 1,000", "#### -5", "#### 0.5", "#### 5", "Bob has 2 apples.\n#### $72", "####",
                "#### ,", "#### 1,000.50", "no hashes"]

MATH_GENERATIONS = [a for a in ANSWERS] + [
    "<answer>\n\\boxed{\\frac{3}{4}}\n</answer><|eot_id|>", "Answer: 3/4 <answer>3/4</answer>",
    "\\boxed{5 <answer>5</answer>", "\\boxed{} <answer>5</answer>", "<answer>5</answer>", "\\boxed{}",
    "\\boxed{5}\n</answer><|eot_id|><|endoftext|>", "$\\boxed 5$ and $\\boxed 6$ end", "\\boxed{72} so k = 72",
]
MATH_TRUTHS = ["72", "\\frac{3}{4}", "5", "12 \\sqrt{2}", "\\left( 1, 2 \\right)", "x/y", "0.5", "10\\%", "1,000"]

COUNTDOWN_EVAL = [  # (numbers, target, generation)
    ([48, 56, 52], 60, "\nTaking 52 away from 56 leaves 4, and 56 - 52 = 4 is too small."),
    ([48, 56, 52], 60, "<answer>\n\\boxed{52 - 56 + 48 + 16}\n</answer>"),
    ([34, 17, 51], 3, "So 51 / 17 is 3.\n</reasoning>\n<answer>\n\\boxed{51 / 17}\n</answer><|eot_id|>"),
    ([60, 85, 87], 62, "<answer>\n\\boxed{87 - 85 + 60}\n</answer>"),
    ([60, 85, 87], 62, "<answer>\n\\boxed{87 - 85 + 60 = 62}\n</answer>"),
    ([60, 85, 87], 62, "$\\boxed{ (85 - 60) - 25}$"),
    ([60, 85, 87], 62, "\\boxed 87 - 85 + 60$ done"),
    ([60, 85, 87], 62, "\\boxed{87 - 85 + 60"),
    ([60, 85, 87], 62, "\\boxed{87 - 85 + 60 <answer>87 - 85 + 60</answer>"),
    ([60, 85, 87], 62, "\\boxed{87 - 85 + 60 <answer>87 - 85 + 61</answer>"),
    ([60, 85, 87], 62, "\\boxed{87 - 85 + 60 no tags"),
    ([60, 85, 87], 62, "<answer>87 - 85 + 60</answer>"),
    ([60, 85, 87], 62, "87 - 85 + 60"),
    ([60, 85, 87], 62, "Using 87 - 85 + 60 = 62 we are done."),
    ([60, 85, 87], 62, "First 87 - 85 = 2, then 2 + 60 = 62."),
    ([60, 85, 87], 62, "\\boxed{\\fbox{87 - 85 + 60}}"),
    ([60, 85, 87], 62, "\\fbox{87 - 85 + 60}"),
    ([20, 3, 4], 15, "\\boxed{20 \\times 3 \\div 4}"),
    ([20, 3, 4], 15, "\\boxed{20 \\cdot 3 / 4}"),
    ([20, 3, 4], 15, "\\boxed{(20 \\times 3) \\div 4 = 15}"),
    ([20, 3, 4], 15, "\\boxed{20 * 3 / 4 = 15.0}"),
    ([20, 3, 4], 15, "\\boxed{20\u00d73\u00f74}"),
    ([85, 85, 60], 62, "\\boxed{60 / (85 - 85)}"),
    ([3, 1, 2], 5, "\\boxed{()*3 + 1 + 2}"),
    ([3, 1, 2], 5, "\\boxed{3 + 1 + 2 + ...}"),
    ([3, 1, 2], 5, "\\boxed{(3)(1) + 2}"),
    ([3, 1, 2], 6, "\\boxed{3 * 1 * 2}"),
    ([3, 1, 2], 6, ""),
    ([3, 1, 2], 6, "\\boxed{}"),
    ([], 0, "\\boxed{()}"),
    ([8, 2, 1], 3, "\\boxed{(-8) ** (1/2) + 1}"),
    ([1, 2, 3], 6, "\\boxed{" + "-" * 1200 + "1 + 2 + 3}"),
]

COUNTDOWN_QUESTIONS = ["Numbers: [48, 56, 52]\nTarget: 60", "numbers: [1, 2, 3]\ntarget: 6",
                       "Numbers: [1,,2]\nTarget: 3",
                       "no numbers here", "Numbers: [3, 1, 2]\nTarget: 5"]


def fuzz_expressions(n: int, seed: int = 0) -> list[str]:
    """Random strings over the characters d1 lets reach eval, at most one '**' (so d1's eval ends)."""
    rng = random.Random(seed)
    atoms = ["1", "2", "3", "7", "10", "25", "99", "0", "00", "01", "1.5", ".5", "2.", "()", "...", "4"]
    ops = ["+", "-", "*", "/", "//", "**", " ", "", "--", "-+", "(", ")", " * ", " / ", "\n"]
    out: list[str] = []
    while len(out) < n:
        parts = []
        k = rng.randint(1, 4)
        for j in range(k):
            if rng.random() < 0.3:
                parts.append(rng.choice(["(", "-", "+", " ", "((", "-("]))
            parts.append(rng.choice(atoms))
            if rng.random() < 0.3:
                parts.append(rng.choice([")", "))", " ", "\t"]))
            if j < k - 1:
                parts.append(rng.choice(ops))
        s = "".join(parts)
        if len(re.findall(r"\*\*", s)) > 1 or not re.search(r"\d", s) or s in out:
            continue
        out.append(s)
    return out


def fuzz_target(expr: str, k: int) -> int:
    try:
        v = _arith_value(expr.strip())
        if isinstance(v, (int, float)) and math.isfinite(v) and k % 3:
            return int(round(v))
    except (_Unevaluable, OverflowError, ValueError):
        pass
    return 7


def written_cases() -> dict:
    """The cases of (b): completions, reward cases (completion index + our columns), eval items."""
    completions: list[str] = []
    index: dict[str, int] = {}

    def add(text: str) -> int:
        if text not in index:
            index[text] = len(completions)
            completions.append(text)
        return index[text]

    grid: dict[tuple[int, int], int] = {}
    for t, template in enumerate(TEMPLATES):
        for a, answer in enumerate(ANSWERS):
            other = ANSWERS[(a + 7) % len(ANSWERS)]
            grid[t, a] = add(template.format(r=REASONING, a=answer, b=other))
    rewards: dict[str, list[dict]] = {name: [] for name in REWARDS}
    for a in range(len(ANSWERS)):
        for g, gold in enumerate(GSM8K_GOLDS):
            rewards["d1_gsm8k"].append({"c": grid[(a + g) % len(TEMPLATES), a], "columns": {"answer": gold}})
        for g, gold in enumerate(MATH_GOLDS):
            rewards["d1_math"].append({"c": grid[(a * 3 + g) % len(TEMPLATES), a], "columns": {"answer": gold}})
    for gold in ("\\boxed{5", "So \\boxed{\\frac{1}{2}"):  # d1 raises on the whole batch
        rewards["d1_math"].append({"c": grid[0, 0], "columns": {"answer": gold}})
    for k, (nums, target, text) in enumerate(COUNTDOWN):
        key = "nums" if k % 2 == 0 else "numbers"
        rewards["d1_countdown"].append({"c": add(text), "columns": {key: nums, "target": target}})
    for k, expr in enumerate(fuzz_expressions(300)):
        nums = [int(x) for x in re.findall(r"\d+", expr)]
        text = f"<reasoning>\nfuzz\n</reasoning>\n<answer>\n{expr}\n</answer>\n"
        rewards["d1_countdown"].append({"c": add(text), "columns": {"nums": nums, "target": fuzz_target(expr, k)}})
    for p, (puzzle, solution) in enumerate(SUDOKU_PUZZLES):
        wrong = solution[::-1]
        fills = dict(s=solution, spaced=" ".join(solution), rows="\n".join(solution[i:i + 4] for i in range(0, 16, 4)),
                     piped=" | ".join(" ".join(solution[i:i + 4]) for i in range(0, 16, 4)), listed=",".join(solution),
                     short=solution[:7], long=solution + "1234", wrong=wrong,
                     sup=solution.translate(str.maketrans("1234", "\u00b9\u00b2\u00b3\u2074")),
                     arabic=solution.translate(str.maketrans("1234", "\u0661\u0662\u0663\u0664")),
                     commas=", ".join(solution))
        for template in SUDOKU_GRIDS:
            rewards["d1_sudoku"].append({"c": add(template.format(**fills)),
                                         "columns": {"puzzle": puzzle, "solution": solution}})
    rewards["d1_sudoku"].append({"c": add("<answer>1234</answer>"), "columns": {"puzzle": "1230", "solution": "1234"}})
    for name in FORMAT_REWARDS:
        rewards[name] = [{"c": i, "columns": {}} for i in range(len(completions))]

    evals: dict[str, list[dict]] = {task: [] for task in EVAL_TASKS}
    for k, gen in enumerate(GSM8K_GENERATIONS):
        for j in range(3):
            truth = GSM8K_TRUTHS[(k + j * 4) % len(GSM8K_TRUTHS)]
            evals["gsm8k"].append({"question": "How much?", "generations": gen,
                                   "ground_truth": d1_gsm8k_gold(truth)})
    for k, gen in enumerate(MATH_GENERATIONS):
        for j in range(3):
            evals["math"].append({"question": "Compute.", "generations": gen,
                                  "ground_truth": MATH_TRUTHS[(k + j * 3) % len(MATH_TRUTHS)]})
    for nums, target, gen in COUNTDOWN_EVAL:
        evals["countdown"].append({"question": f"Numbers: {nums}\nTarget: {target}", "generations": gen,
                                   "ground_truth": [nums, target]})
    for k, question in enumerate(COUNTDOWN_QUESTIONS):  # ground truth not a pair: d1 reads the question
        for gen in ("\\boxed{56 - 52 + 48}", "\\boxed{1 + 2 + 3}", "\\boxed{3 + 1 + 2}", "\\boxed{1 + 2}"):
            evals["countdown"].append({"question": question, "generations": gen, "ground_truth": None if k % 2 else {}})
    for k, expr in enumerate(fuzz_expressions(200, seed=1)):
        nums = [int(x) for x in re.findall(r"\d+", expr)]
        evals["countdown"].append({"question": f"Numbers: {nums}\nTarget: {fuzz_target(expr, k)}",
                                   "generations": f"<reasoning>\nfuzz\n</reasoning>\n<answer>\n"
                                                  f"\\boxed{{{expr}}}\n</answer>",
                                   "ground_truth": [nums, fuzz_target(expr, k)]})
    for p, (puzzle, solution) in enumerate(SUDOKU_PUZZLES):
        case_texts = [completions[c["c"]] for c in rewards["d1_sudoku"] if c["columns"]["puzzle"] == puzzle]
        for k, gen in enumerate(case_texts):
            question = SUDOKU_QUESTIONS[(k + p) % len(SUDOKU_QUESTIONS)].format(p=puzzle)
            evals["sudoku"].append({"question": question, "generations": gen, "ground_truth": solution})
    evals["sudoku"].append({"question": "Sudoku puzzle: 12340", "generations": "x", "ground_truth": "1" * 16})
    evals["sudoku"].append({"question": SUDOKU_QUESTIONS[0].format(p=SUDOKU_PUZZLES[0][0]),
                            "generations": "<answer>1234</answer>", "ground_truth": "1234"})
    return {"completions": completions, "rewards": rewards, "eval": evals}


# ------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------


class Table:
    def __init__(self):
        self.rows: dict[str, dict] = defaultdict(lambda: {"generations": 0, "data": 0, "written": 0, "equal": 0,
                                                          "first": None})

    def add(self, name: str, source: str, equal: bool, detail) -> None:
        row = self.rows[name]
        row[source] += 1
        row["equal"] += bool(equal)
        if not equal and row["first"] is None:
            row["first"] = detail

    def print(self) -> int:
        bad = 0
        print(f"{'function':<34} {'d1 generations':>14} {'data':>6} {'written':>8} {'equal':>7}  first mismatch")
        for name, row in sorted(self.rows.items(), key=lambda kv: (not kv[0].startswith("d1_") or "eval" in kv[0],
                                                                   "arith" in kv[0], kv[0])):
            total = row["generations"] + row["data"] + row["written"]
            bad += total - row["equal"]
            first = "" if row["first"] is None else repr(row["first"])[:300]
            print(f"{name:<34} {row['generations']:>14} {row['data']:>6} {row['written']:>8} {row['equal']:>7}  {first}")
        return bad


def gsm8k_gold_string(truth) -> str | None:
    """The training gold d1's extract_hash_answer gives for a problem whose eval gold is `truth`."""
    if truth is None:
        return None
    return str(int(truth)) if float(truth).is_integer() else repr(truth)


def check_baselines(d1, repo: Path, table: Table) -> None:
    folder = repo / "eval" / "eval_baselines"
    files = sorted(glob.glob(str(folder / "*_generations.json")))
    if not files:
        raise SystemExit(f"no *_generations.json under {folder}")
    per_setup: dict[str, list] = defaultdict(list)
    for path in files:
        setup = re.match(r"(.+)_\d+_generations\.json$", os.path.basename(path)).group(1)
        task = next(t for t in ("gsm", "math", "countdown", "sudoku") if t in setup)
        task = {"gsm": "gsm8k"}.get(task, task)
        items = json.load(open(path))["generations"]
        per_setup[setup].append((task, items))
        # evaluation parse rules
        theirs = d1_eval_items(d1, task, items)
        for item, t in zip(items, theirs):
            ours = our_eval_item(task, item)
            table.add(f"d1_eval_item[{task}]", "generations", same_eval(ours, t),
                      (path, item["question"][:60], ours, t))
            # the record helper rebuilds the item: countdown's question from its ground truth, sudoku's from the puzzle
            question = {"countdown": None, "sudoku": item["question"][-17:-1]}.get(task, item["question"])
            rebuilt = outcome(lambda: d1_eval_record(task, question, item["generations"], item["ground_truth"]))
            same = (not isinstance(rebuilt, Raised) and rebuilt == {k: item[k] for k in rebuilt}
                    and all(type(rebuilt[k]) is type(item[k]) for k in rebuilt))
            table.add(f"d1_eval_record[{task}]", "generations", same, (path, rebuilt, {k: item[k] for k in
                                                                                     ("question", "ground_truth")}))
        # training rewards on the same texts
        for item in items:
            text, truth = item["generations"], item["ground_truth"]
            cases = [(name, {}) for name in FORMAT_REWARDS]
            if task == "gsm8k" and truth is not None:
                cases.append(("d1_gsm8k", {"answer": gsm8k_gold_string(truth)}))
            if task == "math":
                cases.append(("d1_math", {"answer": f"Thus the answer is $\\boxed{{{truth}}}$."}))
            if task == "countdown":
                key = "nums" if len(text) % 2 else "numbers"
                cases.append(("d1_countdown", {key: truth[0], "target": truth[1]}))
            if task == "sudoku":
                puzzle = re.search(r"Sudoku puzzle: ([0-9]{16})", item["question"]).group(1)
                cases.append(("d1_sudoku", {"puzzle": puzzle, "solution": truth}))
            for name, columns in cases:
                ours, theirs = our_reward(name, text, columns), d1_reward(d1, name, text, columns)
                table.add(name, "generations", same_reward(ours, theirs), (path, name, text[-80:], ours, theirs))
    # the accuracy table d1 prints
    with contextlib.redirect_stdout(io.StringIO()) as out:
        d1.parse.aggregate_results(directory=str(folder))
    printed = dict(re.findall(r"^(\S+)\s+(-?[\d.]+)%", out.getvalue(), re.MULTILINE))
    for setup, parts in sorted(per_setup.items()):
        task = parts[0][0]
        items = [it for _, its in parts for it in its]
        ours = d1_eval_accuracy(task, items)
        correct = processed = 0
        for _, its in parts:
            c, p = d1_eval_totals(d1, task, its)
            correct, processed = correct + c, processed + p
        exact = correct / processed * 100 if processed else 0
        shown = printed.get(setup)
        print(f"{setup:<28} d1 prints {shown}%  ours {ours * 100:.2f}%  ({correct} / {processed})")
        table.add("d1_eval_accuracy (printed %.2f)", "generations", shown == f"{ours * 100:.2f}", (setup, ours, shown))
        table.add("d1_eval_accuracy (exact x100)", "generations", ours * 100 == exact, (setup, ours, exact))


def check_data(d1, folder: Path, table: Table) -> None:
    """GSM8K (train + test) and MATH-500 as our loaders read them: the gold columns d1 derives."""
    for split in ("train", "test"):
        for line in open(folder / "gsm8k" / f"{split}.jsonl"):
            solution = json.loads(line)["answer"]
            with quiet():
                gold = d1.reward_func.extract_hash_answer(solution)
                truth = d1.parsers.Parser.extract_answer_gsm8k(solution)
            ours = d1_eval_record("gsm8k", "q", "g", solution)["ground_truth"]
            table.add("d1_eval_record[gsm8k]", "data", same_value(ours, truth), (solution[-40:], ours, truth))
            for text in (f"<answer>\n{gold}\n</answer>", f"<answer>\n{gold.replace(',', '')}\n</answer>"):
                # ours gets the whole solution, d1 its extract_hash_answer
                ours, theirs = our_reward("d1_gsm8k", text, {"answer": solution}), d1_reward(d1, "d1_gsm8k", text,
                                                                                              {"answer": gold})
                table.add("d1_gsm8k", "data", same_reward(ours, theirs), (solution[-40:], text, ours, theirs))
    for line in open(folder / "math500" / "test.jsonl"):
        row = json.loads(line)
        for text in (f"<answer>\n\\boxed{{{row['answer']}}}\n</answer>", row["solution"], "\\boxed{0}"):
            columns = {"answer": row["solution"]}
            ours, theirs = our_reward("d1_math", text, columns), d1_reward(d1, "d1_math", text, columns)
            table.add("d1_math", "data", same_reward(ours, theirs), (row["unique_id"], text[-60:], ours, theirs))
            item = {"question": row["problem"], "generations": text, "ground_truth": row["answer"]}
            ours, theirs = our_eval_item("math", item), d1_eval_items(d1, "math", [item])[0]
            table.add("d1_eval_item[math]", "data", same_eval(ours, theirs), (row["unique_id"], ours, theirs))


def check_written(d1, cases: dict, table: Table) -> dict:
    """Compare on the written cases; returns d1's results for the fixture."""
    completions = cases["completions"]
    recorded: dict = {"rewards": {}, "eval": {}}
    for name, entries in cases["rewards"].items():
        recorded["rewards"][name] = []
        for entry in entries:
            text = completions[entry["c"]]
            ours, theirs = our_reward(name, text, entry["columns"]), d1_reward(d1, name, text, entry["columns"])
            table.add(name, "written", same_reward(ours, theirs), (text[:120], entry["columns"], ours, theirs))
            d1_result = {"raises": theirs.name} if isinstance(theirs, Raised) else theirs
            recorded["rewards"][name].append({**entry, "d1": d1_result})
    for name in FORMAT_REWARDS:  # these score every completion and take no columns: one score per completion
        assert [e["c"] for e in recorded["rewards"][name]] == list(range(len(completions)))
        recorded["rewards"][name] = [e["d1"] for e in recorded["rewards"][name]]
    for task, items in cases["eval"].items():
        theirs = d1_eval_items(d1, task, items)
        results = []
        for item, t in zip(items, theirs):
            ours = our_eval_item(task, item)
            table.add(f"d1_eval_item[{task}]", "written", same_eval(ours, t), (item, ours, t))
            if isinstance(t, Raised):
                results.append({"raises": t.name})
            else:
                results.append({k: repr(v) if k == "evaluation_result" else v for k, v in t.items()})
        usable = [it for it, t in zip(items, theirs) if not isinstance(t, Raised)]
        correct, processed = d1_eval_totals(d1, task, usable)
        exact = correct / processed if processed else 0.0
        ours = d1_eval_accuracy(task, usable)
        table.add("d1_eval_accuracy (exact x100)", "written", ours == exact, (task, ours, exact))
        recorded["eval"][task] = {"items": items, "d1": results, "d1_accuracy": exact}
    # the countdown evaluator on its own, against d1's evaluate_equation (eval) on more random expressions
    rng, spaces = random.Random(2), ["", " ", "\t", "\n", "\n ", " \n", "\x0c", "\r\n", "\x0b", "\n\n  "]
    for expr in fuzz_expressions(5000, seed=2):
        expr = rng.choice(spaces) + expr + rng.choice(spaces)
        with quiet():
            theirs = d1.reward_func.evaluate_equation(expr)
        try:
            ours = _arith_value(expr)
        except _Unevaluable:
            ours = None
        table.add("countdown arithmetic (eval)", "written", same_value(ours, theirs), (expr, ours, theirs))
    recorded["gsm8k_gold"] = []
    for truth in GSM8K_TRUTHS + ["#### 18", "#### $18.00", "#### 1,234,567", "#### \u0667\u0662", "####72"]:
        with quiet():
            theirs = d1.parsers.Parser.extract_answer_gsm8k(truth)
        ours = d1_gsm8k_gold(truth)
        table.add("d1_gsm8k_gold", "written", same_value(ours, theirs), (truth, ours, theirs))
        recorded["gsm8k_gold"].append({"solution": truth, "d1": theirs})
    return recorded


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d1-repo", type=Path, required=True, help="a checkout of github.com/dllm-reasoning/d1")
    ap.add_argument("--write-fixture", type=Path, help="write the written cases with d1's results to this JSON file")
    ap.add_argument("--skip-baselines", action="store_true", help="only the written cases (faster)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                    help="folder with gsm8k/{train,test}.jsonl and math500/test.jsonl (skipped if absent)")
    args = ap.parse_args(argv)
    d1 = load_d1(args.d1_repo)
    table = Table()
    if not args.skip_baselines:
        check_baselines(d1, args.d1_repo, table)
        if (args.data / "gsm8k" / "train.jsonl").is_file() and (args.data / "math500" / "test.jsonl").is_file():
            check_data(d1, args.data, table)
        else:
            print(f"no GSM8K / MATH-500 under {args.data}: the public-data checks are skipped")
    cases = written_cases()
    recorded = check_written(d1, cases, table)
    bad = table.print()
    if args.write_fixture:
        fixture = {
            "about": "d1's results recorded from d1's own code (github.com/dllm-reasoning/d1) by "
                     "scripts/check_d1_rewards.py --write-fixture, on completions and items written in that script "
                     "(none of d1's generation texts). rewards: {name: [{c: index into completions, columns: our "
                     "reward columns, d1: d1's score or {raises: exception}}]}, or for the rewards without columns "
                     "(xmlcount, soft/strict format, int, math_format) d1's score of every completion in order; "
                     "eval: {task: {items in d1's layout, "
                     "d1: per-item results (evaluation_result as repr), d1_accuracy: over the items where d1 does "
                     "not raise}}; gsm8k_gold: eval/parsers.Parser.extract_answer_gsm8k.",
            "completions": cases["completions"],
            **recorded,
        }
        args.write_fixture.parent.mkdir(parents=True, exist_ok=True)
        args.write_fixture.write_text(json.dumps(fixture, ensure_ascii=True, indent=None, separators=(",", ":")) + "\n")
        print(f"wrote {args.write_fixture} ({args.write_fixture.stat().st_size // 1024} KiB)")
    print("all equal" if not bad else f"{bad} MISMATCHES")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
