"""d1's data, as published (Zhao et al. 2025, github.com/dllm-reasoning/d1): the prompts of its GRPO
training (``diffu-grpo/data_utils.py``) and of its evaluation (``eval/{gsm8k,math500,countdown,sudoku}.py``),
and the ``s1k`` task of its SFT stage (``SFT/sft_train.py`` + ``sft_trainer.py:preprocess_dataset``).

The prompt texts are d1's, character for character (a model trained with d1 expects them; the
tests pin a few). Two prompt styles select them for the real tasks:

- ``d1``: the training prompt, one user turn (TRL applies the chat template and the assistant header);
- ``d1_eval``: the evaluation prompt, one user turn plus the assistant turn opened with
  ``<reasoning>`` (d1 appends that text after the assistant header; a chat prompt whose last
  message is the assistant's is continued, TRL's convention, see rollout/prompts.py).
"""

from __future__ import annotations

from rl.tasks.loading import HubSource
from rl.tasks.registry import DataError, Splits, register_task

# ---- training prompts (diffu-grpo/data_utils.py) --------------------------------------------------
TRAIN_FORMAT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
TRAIN_SUDOKU = (
    "\nPlease solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading "
    "left-to-right, top-to-bottom, where '0' represents empty cells.\n\nRules:\n- Fill empty cells with digits 1-4\n"
    "- Each row must contain digits 1-4 exactly once\n- Each column must contain digits 1-4 exactly once\n"
    "- Each 2x2 box must contain digits 1-4 exactly once\n\nImportant: Your solution must be a COMPLETE 16-character "
    "string with only the digits 1-4, representing your final solved grid.\n\nRespond in this exact format:\n"
    "<reasoning>\nYour step-by-step solving process\n</reasoning>\n<answer>\n[16-character solution string with no "
    "spaces or separators]\n</answer>\n")
MATH_EXPERT = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
               "Wrap the final answer in a \\boxed{}.")

# ---- evaluation prompts (eval/*.py); d1 opens the assistant turn with this ----------------------
EVAL_PREFILL = "<reasoning>"
_EVAL_FORMAT = "Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n" \
               "\\boxed{...}\n</answer>"
EVAL_SYSTEM = {
    "gsm8k": f"{MATH_EXPERT} \n{_EVAL_FORMAT}",
    "math500": f"{MATH_EXPERT}\n{_EVAL_FORMAT}\" \n",  # sic: d1's MATH-500 prompt ends with a stray quote
    "countdown": ("Using only the provided numbers, create an arithmetic expression that evaluates to exactly the "
                  "provided target number. You may use the operations +, -, *, and / as needed, but each number must "
                  "be used exactly once. Think step-by-step. After reasoning, provide only your final expression "
                  "inside \\boxed{} tags without including an equals sign or the target number. For example: "
                  f"\\boxed{{a + b * c}}{_EVAL_FORMAT}"),
    "sudoku": TRAIN_SUDOKU,
}

# ---- SFT (SFT/sft_trainer.py) ---------------------------------------------------------------------
SFT_FORMAT = "\nRespond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n...\n" \
             "</answer>\n"
S1K_HUB = {"train": HubSource("simplescaling/s1K", None, "train")}
S1K_EVAL_FRACTION = 0.01  # d1: preprocess_dataset(test_split=0.01)


D1_GEN_LENGTHS = (128, 256, 512)  # d1's evaluation lengths (eval/run_eval.sh runs 128 and 256; 512 in the paper)
# our task -> d1's name for it (its parse rules, and the file names its parser dispatches on)
D1_TASKS = {"gsm8k": "gsm8k", "math500": "math", "countdown": "countdown", "countdown_procedural": "countdown",
            "sudoku4": "sudoku"}


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def eval_prompt(kind: str, question: str) -> list[dict]:
    """d1's evaluation prompt: the task's system text + blank line + question, then ``<reasoning>``."""
    return user(f"{EVAL_SYSTEM[kind]}\n\n{question}") + [{"role": "assistant", "content": EVAL_PREFILL}]


def eval_question(kind: str, row: dict) -> str:
    """The question text d1's evaluation puts after its system prompt (and stores as ``question``)."""
    if kind == "countdown":
        return f"Numbers: {list(row['nums'])}\nTarget: {row['target']}"
    if kind == "sudoku":
        return f"Solve the following Sudoku puzzle: {row['puzzle']}\n"
    return row["question"]


def gsm8k_prompt(question: str, style: str) -> list[dict]:
    """d1's GSM8K prompt: training (``get_gsm8k_questions``) or evaluation (``GSM8KDataset``)."""
    return eval_prompt("gsm8k", question) if style == "d1_eval" else user(f"{TRAIN_FORMAT}\n\n{question}")


def math_prompt(problem: str, style: str) -> list[dict]:
    """d1's MATH prompt: training (``get_math_questions``) or MATH-500 evaluation."""
    if style == "d1_eval":
        return eval_prompt("math500", problem)
    return user(f"{TRAIN_FORMAT}\n\n{MATH_EXPERT} \n\n{problem}")


def countdown_prompt(nums: list[int], target: int, style: str) -> list[dict]:
    """d1's Countdown prompt: training (``get_countdown_questions``) or evaluation (``CTDDataset``)."""
    if style == "d1_eval":
        return eval_prompt("countdown", eval_question("countdown", {"nums": nums, "target": target}))
    return user(f"{TRAIN_FORMAT}\nUsing only the numbers {list(nums)}, create an arithmetic expression that evaluates "
                f"to exactly {target}. You must use all numbers from the list, and each number must be used exactly "
                "once. You may use the operations +, -, *, and / as needed. After reasoning, provide only your final "
                "expression inside <answer></answer> tags without including an equals sign or the target number. For "
                "example, if the numbers are [2, 3, 4] and the target is 5, a valid answer is: "
                "<answer>\n2*4-3\n</answer>")


def sudoku_prompt(puzzle: str, style: str) -> list[dict]:
    """d1's Sudoku prompt: training (``get_sudoku_questions``) or evaluation (``SudokuDataset``)."""
    question = eval_question("sudoku", {"puzzle": puzzle})
    return eval_prompt("sudoku", question) if style == "d1_eval" else user(f"{TRAIN_SUDOKU}\n\n{question}")


def s1k_row(r: dict, where: str, i: int) -> dict:
    """One s1K row as d1's SFT builds it: system text + question as the user turn; the first thinking
    trajectory and the attempt in d1's tags as the response (the assistant turn)."""
    for key in ("question", "thinking_trajectories", "attempt"):
        if key not in r:
            raise DataError(f"{where}: row {i} has no column {key!r} (s1K's columns: question, "
                            f"thinking_trajectories, attempt, ...; got {sorted(r)})")
    trajectories = r["thinking_trajectories"]
    if not isinstance(trajectories, list) or not trajectories or not isinstance(trajectories[0], str):
        raise DataError(f"{where}: row {i}, column 'thinking_trajectories' must be a non-empty list of strings")
    return {"prompt": user(f"{SFT_FORMAT}\n\n{r['question']}"),
            "response": f"<reasoning>{trajectories[0]}</reasoning>\n<answer>{r['attempt']}</answer>",
            "answer": str(r.get("solution") or r["attempt"])}


@register_task("s1k", rewards={"math": 1.0}, accuracy_reward="math")
def s1k(cfg) -> Splits:
    """simplescaling/s1K (Muennighoff et al. 2025), d1's SFT data: 1,000 questions with reasoning
    traces. Every row is an SFT row; ``num_val`` rows (0: d1's 1%) are held out as the SFT stage's
    eval split (``sft``/``val``; no test split: evaluate on the RL task). Scored, if ever used for
    RL, by math equivalence against s1K's ``solution`` column."""
    import random

    from rl.tasks.loading import describe, load_split, resolve_source

    source = resolve_source(cfg, "s1k")
    where = describe(source, S1K_HUB)
    raw = load_split(source, "train", task=cfg.name, folder="s1k", hub=S1K_HUB, hub_config=cfg.hub_config)
    if not raw:
        raise DataError(f"{where}: no rows")
    rows = [s1k_row(r, where, i) for i, r in enumerate(raw)]
    random.Random(cfg.split_seed).shuffle(rows)
    n_val = cfg.num_val or int(len(rows) * S1K_EVAL_FRACTION)
    val, train = rows[:n_val], rows[n_val:]
    return Splits({"sft": train[:cfg.num_sft] if cfg.num_sft else train, "rl": [], "val": val, "test": []}, where)
